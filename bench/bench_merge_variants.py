"""REAM's variants against each other, on the reference model and on a 64-expert model: which default.

Every variant is a :class:`~moe_slim.experts.merge.config.MergeOptions` (a method or preset name,
then ``:key=value`` choices), merged from the same statistics (one ``observe``: 8,000 calibration
tokens per domain, 2,048 merge-sample tokens per domain and layer). Score: KL(original || merged)
per token on held-out text (the test split, ``--held-out`` texts per domain), and for each variant the
95% paired bootstrap (over texts, 1,000 resamples) of its KL minus the KL of ``--baseline`` at the
same ratio; "tie" where the interval holds 0.

Models: ``--model`` (default the shipped reference, 32 experts, top-4) and, with ``--split64``, the
same model with every expert split into two experts of half its neurons (64 experts, top-8): each
child keeps one half of the parent's neurons, its down projection doubled, and the parent's router
row plus a little noise (0.01 x the row's std), so both children are picked where the parent was and
the model computes almost what the parent did (its KL to the 32-expert model is printed). Different
expert count, same language ability, no training.

    nice -n 10 python bench/bench_merge_variants.py [--split64] [--ratios 0.25,0.5] [--variants ream,ream-repo,...]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_merge import DOMAINS, kl_diff_ci, load_texts, token_kl  # noqa: E402
from figures import difference_text  # noqa: E402

from moe_slim.evals.data import read_jsonl  # noqa: E402
from moe_slim.experts.batches import make_batches  # noqa: E402
from moe_slim.experts.merge.driver import merge_model  # noqa: E402
from moe_slim.experts.observe import observe  # noqa: E402
from moe_slim.families import moe_layers  # noqa: E402
from moe_slim.modeling.dispatch import prepare_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ream", "ream:weighting=p2norm-routed", "ream:centroids=p2norm-routed", "ream:pca=layer",
            "ream:group_size=16", "ream:sequential=true", "ream-repo", "ream-repo:sequential=false")


@torch.no_grad()
def split_experts(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model with each expert split into two experts of half its neurons (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    prepare_model(model)
    cfg = copy.deepcopy(model.config)
    E, n = cfg.num_experts, cfg.moe_intermediate_size
    cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size = 2 * E, 2 * cfg.num_experts_per_tok, n // 2
    new = AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    new.load_state_dict({k: v for k, v in model.state_dict().items() if ".mlp." not in k}, strict=False)
    g = torch.Generator().manual_seed(seed)
    prepare_model(new)
    for old, lay in zip(moe_layers(model), moe_layers(new)):
        gu, down = old.experts.gate_up_proj, old.experts.down_proj  # [E, 2n, H], [E, H, n] (Qwen3-MoE)
        h = n // 2
        halves = [torch.arange(0, h), torch.arange(h, n)]
        lay.experts.gate_up_proj.copy_(torch.stack([gu[e, torch.cat([i, i + n])] for e in range(E) for i in halves]))
        lay.experts.down_proj.copy_(torch.stack([2 * down[e][:, i] for e in range(E) for i in halves]))
        w = old.router_weight.detach().float()
        rows = w.repeat_interleave(2, dim=0)
        noise = torch.randn(rows.shape, generator=g) * 0.01 * w.std(dim=1, keepdim=True).repeat_interleave(2, dim=0)
        lay.router_weight.copy_(rows + noise)
    return new


def merge(variant: str, base: torch.nn.Module, stats, ratio: float, args) -> tuple[torch.nn.Module, float]:
    name, *opts = variant.split(":")
    choices = {}
    for o in opts:
        k, v = o.split("=", 1)
        choices[k] = {"true": True, "false": False}.get(v, int(v) if v.isdigit() else v)
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    merge_model(model, stats, name, ratio, max_tokens=args.samples * len(stats.domains), calibration=args.calib,
                tokenizer=args.tok, seq_len=args.seq_len, **choices)
    return model, time.perf_counter() - t0


def run_model(label: str, base: torch.nn.Module, tok, args) -> None:
    data = Path(args.data)
    t0 = time.perf_counter()
    stats = observe(base, tok, load_texts(data, "calibration"), seq_len=args.seq_len, batch_size=8,
                    samples=args.samples, max_tokens=args.calib_tokens)
    held = [str(r["text"]) for d in DOMAINS for r in read_jsonl(data / d / "test.jsonl")[: args.held_out]]
    batches = make_batches(tok, held, seq_len=128, batch_size=1, max_tokens=None, pack=False)
    with torch.no_grad():
        ref = [base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
               for b in batches]
    n_tok = int(sum(int(b.attention_mask.sum()) for b in batches))
    E = moe_layers(base)[0].num_experts
    print(f"\n## {label}: {E} experts, top-{base.config.num_experts_per_tok}; observe {time.perf_counter() - t0:.0f}s; "
          f"held-out (test split): n = {len(held)} texts, {n_tok} tokens", flush=True)
    if args.reference_logits is not None:  # the split model against the model it was split from
        kl = token_kl(args.reference_logits, base, batches)
        print(f"KL(32-expert model || this model) = {kl[0].sum() / kl[2].sum():.5f} per token, "
              f"top-1 agreement {kl[1].sum() / kl[2].sum():.3f}", flush=True)
    args.reference_logits = ref
    for ratio in [float(r) for r in args.ratios.split(",")]:
        got = {}
        for v in args.variants.split(","):
            model, secs = merge(v, base, stats, ratio, args)
            got[v] = (token_kl(ref, model, batches), secs)
            del model
        kb = got[args.baseline][0]
        print(f"\n| variant | removed | KL | ΔKL vs {args.baseline} [95% CI] | verdict | time s |")
        print("|---|---|---|---|---|---|")
        for v, (kl, secs) in got.items():
            mean = kl[0].sum() / kl[2].sum()
            lo, hi = kl_diff_ci(kl, kb)
            d = mean - kb[0].sum() / kb[2].sum()
            print(f"| {v} | {ratio:.0%} | {mean:.4f} | {difference_text(d, (lo, hi), digits=4)} | "
                  f"{'tie' if lo <= 0 <= hi else ('better' if hi < 0 else 'worse')} | {secs:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "reference"))
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--baseline", default="ream")
    ap.add_argument("--split64", action="store_true", help="also the 64-expert split of the model")
    ap.add_argument("--only-split", action="store_true", help="only the 64-expert split")
    ap.add_argument("--calib-tokens", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    from moe_slim.modeling.loading import load_model

    base, tok = load_model(args.model, dtype=torch.float32)
    base.eval()
    args.tok = tok
    args.calib = {d: t[:200] for d, t in load_texts(Path(args.data), "calibration").items()}
    args.reference_logits = None
    if not args.only_split:
        run_model(f"{Path(args.model).name}", base, tok, args)
    if args.split64 or args.only_split:
        if args.reference_logits is None:  # the split model's KL is read against the unsplit model's logits
            data = Path(args.data)
            held = [str(r["text"]) for d in DOMAINS for r in read_jsonl(data / d / "test.jsonl")[: args.held_out]]
            with torch.no_grad():
                args.reference_logits = [
                    base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
                    for b in make_batches(tok, held, seq_len=128, batch_size=1, max_tokens=None, pack=False)]
        run_model(f"{Path(args.model).name} split to 64 experts", split_experts(base), tok, args)


if __name__ == "__main__":
    main()
