"""Observation overhead: observe (all statistics) vs a plain no-grad forward, same batches, one process.

Model: Qwen3-MoE-shaped, ~50M parameters, 32 experts, top-4, random weights. Also times the
REAP-style alternative that runs every expert on every token to get output norms. Prints the
ratio last. Target: observe <= 1.15x the plain forward.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_slim.experts.batches import Batch, run_batch
from moe_slim.experts.prune import count_parameters
from moe_slim.experts.recorder import Recorder, observing
from moe_slim.families import moe_layers

REPEATS = 3
N_BATCHES, BATCH, SEQ = 4, 8, 256


def build() -> Qwen3MoeForCausalLM:
    cfg = Qwen3MoeConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=5, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, moe_intermediate_size=192, num_experts=32,
                         num_experts_per_tok=4, intermediate_size=1024, max_position_embeddings=SEQ,
                         norm_topk_prob=True)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


def reap_style(model: torch.nn.Module):
    """Forward hooks that run all experts on all tokens and take every output norm (REAP's approach)."""
    handles = []
    for layer in moe_layers(model):
        experts = layer.experts

        def hook(module, args, output, experts=experts):
            hidden = args[0]
            T = hidden.shape[0]
            E = experts.num_experts
            idx = torch.arange(E).repeat(T).view(T * E, 1)
            rows = hidden.repeat_interleave(E, dim=0)
            out = type(experts).forward(experts, rows, idx, torch.ones(T * E, 1))
            module._all_norms = out.norm(dim=-1).view(T, E)

        handles.append(experts.register_forward_hook(hook))
    return handles


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build()
    g = torch.Generator().manual_seed(1)
    batches = [Batch(torch.randint(0, 4096, (BATCH, SEQ), generator=g), torch.ones(BATCH, SEQ, dtype=torch.long))
               for _ in range(N_BATCHES)]
    layers = moe_layers(model)
    print(f"model: {count_parameters(model)/1e6:.1f}M parameters, {len(layers)} MoE layers x 32 experts, top-4; "
          f"{N_BATCHES} batches of {BATCH}x{SEQ} tokens; torch threads {torch.get_num_threads()}")

    def plain() -> None:
        for b in batches:
            run_batch(model, b)

    def observed() -> None:
        rec = Recorder(layers, 32)
        rec.begin("bench")
        with observing(model, rec):
            for b in batches:
                run_batch(model, b, rec)

    def reap() -> None:
        handles = reap_style(model)
        try:
            for b in batches:
                run_batch(model, b)
        finally:
            for h in handles:
                h.remove()

    times: dict[str, list[float]] = {"plain": [], "observe": [], "reap_all_experts": []}
    with torch.no_grad():
        plain()  # warm-up
        observed()
        for _ in range(REPEATS):
            for name, fn in (("plain", plain), ("observe", observed), ("reap_all_experts", reap)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:18s} median {med[k]:.3f}s  runs {[round(x, 3) for x in v]}")
    print(f"reap_all_experts / plain: {med['reap_all_experts'] / med['plain']:.2f}x")
    print(f"observe / plain: {med['observe'] / med['plain']:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
