"""Pruning is exact on every family: against the unpruned model and the masked-routing model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from core_helpers import experts_masked, forward_logits, keep_pattern
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from moe_slim.checkpoint.save import save_checkpoint
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.experts.prune import apply_plan, count_parameters
from moe_slim.families import family_of, moe_layers
from moe_slim.modeling.dispatch import prepare_model
from moe_slim.modeling.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer


def _plan(model: torch.nn.Module, keep: list[list[int]]) -> ExpertPlan:
    layers = moe_layers(model)
    fam = layers[0].family
    return ExpertPlan(fam.name, layers[0].num_experts, fam.top_k(model.config),
                      [LayerPlan(l.name, k) for l, k in zip(layers, keep)])


@pytest.fixture(params=TINY_FAMILIES)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return prepare_model(tiny_model(request.param, seed=1))


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return ids, mask


def test_pruning_nothing_reproduces_logits_exactly(model: torch.nn.Module) -> None:
    ids, mask = _ids()
    ref = forward_logits(model, ids, mask)
    n = moe_layers(model)[0].num_experts
    pruned = apply_plan(copy.deepcopy(model), _plan(model, [list(range(n))] * len(moe_layers(model))))
    assert torch.equal(forward_logits(pruned, ids, mask), ref)


def test_pruned_equals_masked_routing(model: torch.nn.Module) -> None:
    """Exact up to float rounding on every family.

    Switch and NLLB route with expert capacity; removing experts does not change the kept
    experts' token queues (capacity counts per expert, and the eval capacity of NLLB is a token
    fraction), so the identity holds there too.
    """
    ids, mask = _ids()
    plan = _plan(model, keep_pattern(len(moe_layers(model))))
    with experts_masked(model, plan):
        masked = forward_logits(model, ids, mask)
    full = forward_logits(model, ids, mask)
    pruned = apply_plan(copy.deepcopy(model), plan)
    out = forward_logits(pruned, ids, mask)
    assert (out - full).abs().max() > 1e-4, "the plan must change the model, or the test proves nothing"
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    for layer in moe_layers(pruned):
        assert layer.num_experts == 4


def test_pruned_checkpoint_reloads_and_generates(model: torch.nn.Module, tmp_path) -> None:
    tok = tiny_tokenizer()
    plan = _plan(model, keep_pattern(len(moe_layers(model))))
    before = count_parameters(model)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert count_parameters(pruned) < before
    ids, mask = _ids()
    expected = forward_logits(pruned, ids, mask)
    save_checkpoint(pruned, tok, tmp_path / "out", card="# test", plan=plan)
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    reloaded = prepare_model(auto.from_pretrained(tmp_path / "out").eval())
    fam = family_of(reloaded)
    assert fam.num_experts(reloaded.config) == 4
    assert fam.top_k(reloaded.config) <= 4
    assert all(l.num_experts == 4 for l in moe_layers(reloaded))
    torch.testing.assert_close(forward_logits(reloaded, ids, mask), expected, rtol=1e-5, atol=1e-5)
    gen = reloaded.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] >= 5 if not model.config.is_encoder_decoder else gen.shape[1] >= 2
    assert (tmp_path / "out" / "plan.json").exists() and (tmp_path / "out" / "README.md").exists()


def _observe_with_outputs(model: torch.nn.Module, part: str = "router") -> tuple[dict[str, torch.Tensor], list[Any]]:
    """One domain's statistics of one unpadded text, and every MoE layer's ``part`` ("router" or "block")
    call in that run as ``(args, output)``."""
    from moe_slim.experts.observe import observe

    outputs: list[Any] = []
    hooks = [getattr(l, part).register_forward_hook(lambda m, a, o: outputs.append((a, o))) for l in moe_layers(model)]
    try:
        stats = observe(model, tiny_tokenizer(), {"d": ["the cat sat on the mat and looked at 12 birds"]}, seq_len=64,
                        batch_size=1)
    finally:
        for h in hooks:
            h.remove()
    return stats.domains["d"], outputs


def test_llama4_observation_reads_routing_at_the_router_and_norms_of_unscaled_tokens() -> None:
    """Llama-4's experts get ``x * w`` and no routing: observe records the router's top-k, its sigmoid
    weight, and ``||f(x)||`` of the unscaled token (computed here by hand from the weights)."""
    model = tiny_model("llama4", seed=1)
    layers = moe_layers(model)
    acc, calls = _observe_with_outputs(model, "block")
    seen = [(a[0].reshape(-1, a[0].shape[-1]), o[0], o[1]) for a, o in calls]
    assert len(seen) == len(layers)
    for li, (layer, (x, out, logits)) in enumerate(zip(layers, seen)):
        assert int(acc["tokens"][li]) == x.shape[0], "the calibration batch must hold no padding"
        ex = layer.experts
        idx = logits.topk(model.config.num_experts_per_tok, dim=-1).indices
        w = logits.gather(-1, idx).sigmoid()
        inter = ex.down_proj.shape[1]

        def f(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = (rows @ ex.gate_up_proj[e]).split(inter, dim=-1)
            return (torch.nn.functional.silu(gate) * up) @ ex.down_proj[e]

        routed = torch.zeros_like(x)
        count, wsum, nsum = torch.zeros(8), torch.zeros(8), torch.zeros(8)
        for t in range(x.shape[0]):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                routed[t] += f(e, w[t, k] * x[t])  # what the layer adds: the expert of the scaled token
                count[e] += 1
                wsum[e] += w[t, k]
                nsum[e] += f(e, x[t]).norm()  # what REAP/EAN read: the expert of the unscaled token
        torch.testing.assert_close(out - layer.block.shared_expert(x), routed, rtol=1e-5, atol=1e-6)
        assert torch.equal(acc["count"][li].float(), count)
        torch.testing.assert_close(acc["weight_sum"][li].float(), wsum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc["norm_sum"][li].float(), nsum, rtol=1e-5, atol=1e-6)


def test_mone_is_refused_for_experts_that_take_router_scaled_inputs(tmp_path) -> None:
    """A novice returns ``w * c``; Llama-4's layer adds ``f(w x)``: refused in one line, nothing written."""
    from moe_slim.api.mone import mone_checkpoint
    from moe_slim.errors import MoeSlimError
    from moe_slim.modeling.tiny import save_tiny

    src = save_tiny("llama4", tmp_path / "src")
    with pytest.raises(MoeSlimError, match="MoNE is not supported for llama4_text: .*router-scaled inputs"):
        mone_checkpoint(src, tmp_path / "no-stats", tmp_path / "out", ratio=0.5)
    assert not (tmp_path / "out").exists()


def test_gemma4_gate_statistics_are_the_scaled_combine_weights() -> None:
    """Gemma-4's router hands the experts softmax top-k renormalised to 1, times per_expert_scale: every gate
    statistic is of those weights, REAP's renormalisation keeps the scale, the soft mass is scaled too."""
    model = tiny_model("gemma4", seed=1)
    layers = moe_layers(model)
    acc, calls = _observe_with_outputs(model)
    assert len(calls) == len(layers)
    for li, (layer, (_, (probs, weights, index))) in enumerate(zip(layers, calls)):
        scale = layer.router.per_expert_scale.detach()
        assert scale.std() > 0.1, "the tiny model must vary the per-expert scale, or this test cannot fail"
        torch.testing.assert_close(weights, probs.gather(-1, index) / probs.gather(-1, index).sum(-1, keepdim=True)
                                   * scale[index])
        count = torch.zeros(8).index_add_(0, index.reshape(-1), torch.ones(index.numel()))
        wsum = torch.zeros(8).index_add_(0, index.reshape(-1), weights.reshape(-1).float())
        assert int(acc["tokens"][li]) == probs.shape[0]
        assert torch.equal(acc["count"][li].float(), count)
        torch.testing.assert_close(acc["weight_sum"][li].float(), wsum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc["soft_sum"][li].float(), (probs * scale).sum(0), rtol=1e-5, atol=1e-5)
        # the router renormalised already: REAP's renormalised weight is the combine weight itself
        torch.testing.assert_close(acc["rwnorm_sum"][li], acc["wnorm_sum"][li], rtol=1e-9, atol=1e-9)


def test_zaya_skip_expert_counts_for_no_expert_and_survives_pruning() -> None:
    """Zaya's router scores E experts and a skip expert, which it hands over as expert 0 with weight 0. A
    skip counts for no expert; pruning keeps the skip row and bias and equals the masked original."""
    model = tiny_model("zaya", seed=1)
    layers = moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.router.balancing_biases.copy_(torch.arange(9) * 1e-3)  # the skip chosen for some tokens, not all
    acc, calls = _observe_with_outputs(model)
    layers_skipping = 0
    for li, (layer, (_, out)) in enumerate(zip(layers, calls)):
        logits, weights = out[0], out[1]
        choice = (logits.softmax(-1) + layer.router.balancing_biases).argmax(-1)  # 8: the skip expert
        skipped = int((choice == 8).sum())
        assert skipped < choice.numel(), f"layer {li}: the skip expert must not take every token"
        layers_skipping += skipped > 0
        assert int((weights.reshape(-1) == 0).sum()) == skipped
        assert torch.equal(acc["count"][li].float(), torch.bincount(choice, minlength=9)[:8].float())
    assert layers_skipping > 0, "the skip expert must be chosen for some tokens in some layer"
    plan = _plan(model, keep_pattern(len(layers)))
    ids, _ = _ids()
    with experts_masked(model, plan):
        masked = forward_logits(model, ids)
    pruned = apply_plan(copy.deepcopy(model), plan)
    for layer, lp in zip(moe_layers(pruned), plan.layers):
        assert layer.num_experts == 4 and layer.router.num_router_classes == 5
        assert torch.equal(layer.router.balancing_biases, torch.tensor([*lp.keep, 8]) * 1e-3)
    assert (masked - forward_logits(model, ids)).abs().max() > 1e-4, "the plan must change the model"
    torch.testing.assert_close(forward_logits(pruned, ids), masked, rtol=1e-4, atol=1e-4)
