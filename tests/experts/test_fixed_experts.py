"""LongCat-Flash's zero-computation experts: the router, its correction bias and the experts'
``gate_up_proj`` run over ``n_routed_experts + zero_expert_num`` rows, the zero (identity) experts
last. Plans rank and remove real experts only; every such tensor keeps the kept experts' rows and
then every zero expert's, and the counts (config, router, experts) say so."""

from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import experts_masked, forward_logits

from moe_slim.experts.observe import observe
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.experts.prune import apply_plan
from moe_slim.families import moe_layers
from moe_slim.modeling.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
KEEP = [[1, 2, 5, 7], [0, 3, 4, 6]]


def test_plans_slice_real_experts_and_keep_the_zero_experts() -> None:
    model = tiny_model("longcat_flash", seed=1)
    layers = moe_layers(model)
    assert [(l.num_experts, l.num_fixed) for l in layers] == [(8, 3)] * 2
    chosen: list[torch.Tensor] = []
    hooks = [l.router.register_forward_hook(lambda m, a, o: chosen.append(o[2])) for l in layers]
    before = forward_logits(model, IDS)
    for h in hooks:
        h.remove()
    assert any(bool((c >= 8).any()) for c in chosen), "the router must pick zero experts on these tokens"
    plan = ExpertPlan("longcat_flash", 8, 2, [LayerPlan(l.name, k) for l, k in zip(layers, KEEP)])
    old = [{k: v.clone() for k, v in l.block.state_dict().items()} for l in layers]
    pruned = apply_plan(copy.deepcopy(model), plan)
    for layer, keep, o in zip(moe_layers(pruned), KEEP, old):
        rows = keep + [8, 9, 10]
        for name in ("router.classifier.weight", "router.e_score_correction_bias", "experts.gate_up_proj"):
            assert torch.equal(layer.block.state_dict()[name], o[name][rows]), name
        assert torch.equal(layer.experts.down_proj, o["experts.down_proj"][keep])
        assert (layer.num_experts, layer.num_fixed) == (4, 3)
        assert (layer.router.num_experts, layer.router.n_routed_experts) == (4, 7)
        assert (layer.experts.num_routed_experts, layer.experts.total_experts) == (4, 7)
    assert (pruned.config.n_routed_experts, pruned.config.zero_expert_num) == (4, 3)
    with experts_masked(model, plan):
        masked = forward_logits(model, IDS)
    assert (masked - before).abs().max() > 1e-4
    torch.testing.assert_close(forward_logits(pruned, IDS), masked, rtol=1e-4, atol=1e-4)


def test_statistics_cover_the_real_experts_only() -> None:
    model = tiny_model("longcat_flash", seed=1)
    stats = observe(model, tiny_tokenizer(), {"general": ["the cat sat on the mat; 0123456789 abc"] * 2},
                    seq_len=16, batch_size=2).mix(None)
    assert stats.count.shape == stats.soft_sum.shape == (2, 8)
    tokens = stats.tokens.unsqueeze(1)
    # each token picks 2 experts, some of them zero experts: the real ones are picked fewer than 2 x tokens times,
    # and the zero experts' share of the router's score is no real expert's
    assert bool((stats.count.sum(1, keepdim=True) < 2 * tokens).all())
    assert bool((stats.soft_sum.sum(1, keepdim=True) < tokens).all()) and bool((stats.soft_sum > 0).all())
