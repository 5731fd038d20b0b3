"""Merging that holds up: the router row a merged expert keeps, the papers' tied merge, REAM's group size,
alignment tokens from every domain, M-SMoE's dominants (issue 19)."""

from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import duplicate_experts, forward_logits

from moe_slim.errors import MoeSlimError
from moe_slim.experts.merge import driver as merge_driver
from moe_slim.experts.merge.apply import apply_merge_plan
from moe_slim.experts.merge.driver import merge_model
from moe_slim.experts.merge.methods import METHODS
from moe_slim.experts.merge.options import default_group_size, pca_rows
from moe_slim.experts.merge.tensors import expert_tensors
from moe_slim.experts.observe import observe
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.experts.prune import apply_plan
from moe_slim.experts.stats import RouterStats
from moe_slim.families import family_of, moe_layers
from moe_slim.modeling.dispatch import prepare_model
from moe_slim.modeling.tiny import tiny_model, tiny_tokenizer

TEXTS = {
    "general": ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, they said"],
    "code": ["def f(x):\n    return x * 2", "for i in range(10): print(i)"],
}
# (routed original, rarely routed copy): the copy has the LOWER index, so any rule that breaks ties by index
# (HC-SMoE's "member nearest the cluster mean": both are equally near) keeps the copy's router row
PAIRS = [[1, 0], [3, 2], [5, 4], [7, 6]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def _copies(mt: str) -> tuple[torch.nn.Module, RouterStats]:
    """Experts 0, 2, 4, 6 copy 1, 3, 5, 7 and are routed by 0.05 x their rows (never in the statistics)."""
    model = prepare_model(tiny_model(mt, seed=1))
    duplicate_experts(model, PAIRS)
    stats = observe(model, tiny_tokenizer(), TEXTS, seq_len=48, batch_size=2, samples=96)
    for dom in stats.domains.values():
        for f in ("count", "weight_sum", "norm_sum", "wnorm_sum", "rwnorm_sum"):
            dom[f][:, [d for _, d in PAIRS]] = 0
    return model, stats


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mt", ["qwen3_moe", "deepseek_v3"])
def test_merged_expert_keeps_the_router_row_of_its_routed_member(mt: str, method: str) -> None:
    model, stats = _copies(mt)
    merged = copy.deepcopy(model)
    plan = merge_model(merged, stats, method, 0.5, group_size=2)
    for lp in plan.layers:
        assert sorted(sorted(g) for g in lp.groups) == sorted(sorted(p) for p in PAIRS), (lp.name, lp.groups)
        assert lp.keep == [c for c, _ in PAIRS], lp.keep  # the routed member's row, never the copy's
    fam = family_of(model)
    prune = ExpertPlan(fam.name, 8, fam.top_k(model.config), [LayerPlan(l.name, l.keep) for l in plan.layers])
    pruned = apply_plan(copy.deepcopy(model), prune)
    torch.testing.assert_close(forward_logits(merged, _ids()), forward_logits(pruned, _ids()), rtol=1e-5, atol=1e-5)
    # the paper's own representative (nearest the mean; ties: lowest index) keeps the copy's row
    if method == "hc-smoe":
        paper = merge_model(copy.deepcopy(model), stats, method, 0.5, router_row="method")
        assert paper.layers[0].keep == [d for _, d in PAIRS]


@pytest.mark.parametrize("method", ["hc-smoe", "m-smoe"])
def test_tied_merge_binds_members_keeps_the_router_and_replays(method: str) -> None:
    model, stats = _copies("qwen3_moe")
    tied = copy.deepcopy(model)
    plan = merge_model(tied, stats, method, 0.5, tied=True)
    assert plan.info["tied"] is True
    for layer, lp in zip(moe_layers(tied), plan.layers):
        assert layer.num_experts == 8  # nothing shrinks: the papers' merge
        for g in lp.groups:
            for m in g[1:]:
                for name, t in expert_tensors(layer, m).items():
                    assert torch.equal(t, expert_tensors(layer, g[0])[name])
    # members are exact copies, so binding them to their merge changes nothing
    torch.testing.assert_close(forward_logits(tied, _ids()), forward_logits(model, _ids()), rtol=1e-5, atol=1e-5)
    replay = apply_merge_plan(copy.deepcopy(model), plan)
    torch.testing.assert_close(forward_logits(replay, _ids()), forward_logits(tied, _ids()), rtol=0, atol=0)


def test_global_dominants_need_a_tied_msmoe_and_vary_per_layer() -> None:
    model, stats = _copies("qwen3_moe")
    with pytest.raises(MoeSlimError, match="tied"):
        merge_model(copy.deepcopy(model), stats, "m-smoe", 0.5, global_dominants=True)
    plan = merge_model(copy.deepcopy(model), stats, "m-smoe", 0.5, tied=True, global_dominants=True,
                       dominants="saliency")
    assert sum(len(l.groups) for l in plan.layers) >= 4 * len(plan.layers) - len(plan.layers)
    assert all(len(l.groups) >= 1 for l in plan.layers)


def test_ream_group_size_is_the_repositorys_16_at_most_half_the_experts() -> None:
    assert default_group_size(128, 64) == 16  # REAM's repository C
    assert default_group_size(32, 24) == 16 and default_group_size(64, 16) == 16
    assert default_group_size(16, 12) == 8  # at most half the experts
    assert default_group_size(40, 2) == 20  # never too small to cover every expert
    assert default_group_size(64, 32, n_group=8) == 4  # per router group of 8
    model, stats = _copies("qwen3_moe")
    plan = merge_model(copy.deepcopy(model), stats, "ream", 0.25)  # 8 -> 6 experts
    assert plan.info["group_size"] == 4 and max(len(g) for l in plan.layers for g in l.groups) <= 4


def test_alignment_tokens_come_from_every_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    model, stats = _copies("qwen3_moe")
    seen: list[torch.Tensor] = []
    real = merge_driver.ExpertRunner.hidden

    def spy(self, e, x):
        seen.append(x)
        return real(self, e, x)

    monkeypatch.setattr(merge_driver.ExpertRunner, "hidden", spy)
    merge_model(copy.deepcopy(model), stats, "ream", 0.5, align_tokens=32, group_size=2)
    x_align = seen[0]
    assert x_align.shape[0] == 32
    for d in stats.samples.domains:  # rows of every domain's sample of layer 0 are among the alignment tokens
        x_d = stats.samples.get(d, 0, "x")
        hit = (x_align[:, None, :] == x_d[None, :, :]).all(-1).any(1)
        assert hit.any(), d


def test_pca_of_weight_features_keeps_distances_it_can() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert pca_rows(a, b, 64)[0] is a  # fewer features than dims: unchanged
    low = torch.randn(12, 3, generator=g) @ torch.randn(3, 80, generator=g)  # rank 3 in 80 dims
    pa, pb = pca_rows(low[:6], low[6:], 8)
    assert pa.shape == (6, 8)
    torch.testing.assert_close(torch.cdist(pa, pb), torch.cdist(low[:6], low[6:]), rtol=1e-3, atol=1e-3)


def test_super_experts_are_never_removed_nor_merged() -> None:
    from moe_slim.api import plan_for
    from moe_slim.experts.superexperts import super_experts

    model, stats = _copies("qwen3_moe")
    assert not super_experts(stats).any()  # a tiny random model has no outlier
    for dom in stats.domains.values():  # expert 2 (a never-routed copy, saliency 0) once returned a huge output
        dom["norm_max"][:, 2] = dom["norm_max"].max() * 1e4
    sup = super_experts(stats)
    assert sup[:, 2].all() and int(sup.sum()) == sup.shape[0]
    assert 2 not in plan_for(model, stats, criterion="reap", ratio=0.5).layers[0].keep
    assert all(2 in l.keep for l in plan_for(model, stats, criterion="reap", ratio=0.5, protect_super=True).layers)
    for method in ("ream", "hc-smoe", "m-smoe"):
        plan = merge_model(copy.deepcopy(model), stats, method, 0.5, protect_super=True)
        assert all([2] in l.groups for l in plan.layers), (method, plan.layers[0].groups)
        assert plan.info["protect_super"] is True


def test_cli_tied_global_dominants_write_a_checkpoint_of_the_original_size(tmp_path) -> None:
    import json

    from moe_slim.cli import main
    from moe_slim.modeling.tiny import save_tiny

    src = tmp_path / "model"
    save_tiny("qwen3_moe", src, seed=3)
    assert main(["merge", str(src), "--calib", f"{tmp_path / 'c.jsonl'}", "--method", "m-smoe", "--ratio", "0.5",
                 "--tied", "--global-dominants", "--samples", "64", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS["general"] + TEXTS["code"]))
    assert main(["merge", str(src), "--calib", str(tmp_path / "c.jsonl"), "--method", "m-smoe", "--ratio", "0.5",
                 "--tied", "--global-dominants", "--router-row", "saliency", "--samples", "64",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == 8
    assert "tied" in (tmp_path / "out" / "README.md").read_text()


def test_ream_notes_a_group_size_as_large_as_the_expert_count_and_weighs_by_p2_norm(capsys) -> None:
    from moe_slim.experts.merge.options import group_weights

    model, stats = _copies("qwen3_moe")
    plan = merge_model(copy.deepcopy(model), stats, "ream", 0.5, group_size=8)
    assert "at least the expert count (8)" in capsys.readouterr().err
    assert plan.info["weighting"] == "p2norm-all"  # p^2*||f|| over every sample token by default
    freq, sal, p2 = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 3.0, 0.0]), torch.tensor([2.0, 6.0, 1.0])
    assert group_weights([[0, 1, 2]], "p2norm-all", freq, p2) == [[2 / 9, 6 / 9, 1 / 9]]
    assert group_weights([[0, 1, 2]], "saliency", freq, sal) == [[1 / 5, 3 / 5, 1 / 5]]  # unused: the least
