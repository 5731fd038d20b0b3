"""Budgets and plans on hand-made scores."""

from __future__ import annotations

import json

import pytest
import torch

from moe_slim.errors import MoeSlimError
from moe_slim.experts.plan import ExpertPlan, global_counts, make_plan
from moe_slim.families import family_of
from moe_slim.modeling.tiny import tiny_config

SCORES = torch.tensor([
    [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
    [1.0, 1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0],
], dtype=torch.float64)


def _plan(model_type: str, scores=SCORES, **kw) -> ExpertPlan:
    cfg = tiny_config(model_type)
    names = [f"l{i}" for i in range(scores.shape[0])]
    return make_plan(scores, family=family_of(cfg), config=cfg, layer_names=names, **kw)


def test_uniform_keeps_the_top_scores_per_layer() -> None:
    plan = _plan("qwen3_moe", ratio=0.5)
    assert [l.keep for l in plan.layers] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan.uniform and plan.kept_counts == [4, 4]


def test_ties_break_by_lower_index() -> None:
    plan = _plan("qwen3_moe", ratio=0.75)
    assert plan.layers[1].keep == [4, 5]


def test_global_budget_follows_normalised_scores_and_respects_the_floor() -> None:
    # layer 1 concentrates its mass in 4 experts; layer 0 spreads it
    counts = global_counts(SCORES, ratio=0.5, floor=2)
    assert sum(counts) == 8 and min(counts) >= 2
    assert counts == [4, 4] or counts[1] >= 4
    skewed = torch.tensor([[1.0] * 8, [100.0, 100.0, 100.0] + [0.001] * 5], dtype=torch.float64)
    counts = global_counts(skewed, ratio=0.5, floor=2)
    assert counts == [5, 3]
    counts = global_counts(skewed, ratio=0.5, floor=4)
    assert counts == [4, 4]
    plan = _plan("qwen3_moe", skewed, ratio=0.5, budget="global", floor=1)  # floor is raised to top-k
    assert min(plan.kept_counts) >= 2 and sum(plan.kept_counts) == 8


def test_explicit_budget_file(tmp_path) -> None:
    f = tmp_path / "b.yaml"
    f.write_text("l0: 2\nl1: 6\n")
    plan = _plan("qwen3_moe", budget=str(f))
    assert plan.kept_counts == [2, 6]
    f.write_text(json.dumps([2]))
    with pytest.raises(MoeSlimError, match="one integer count per MoE layer"):
        _plan("qwen3_moe", budget=str(f))


def test_group_limited_routers_prune_equally_per_group() -> None:
    plan = _plan("deepseek_v3", ratio=0.5)
    for lp in plan.layers:
        assert sum(i < 4 for i in lp.keep) == 2 and sum(i >= 4 for i in lp.keep) == 2
    assert plan.layers[1].keep == [0, 1, 4, 5]
    with pytest.raises(MoeSlimError, match="multiple of 2"):
        _plan("deepseek_v3", ratio=0.625)
    with pytest.raises(MoeSlimError, match="at least 2 experts"):
        _plan("deepseek_v3", ratio=0.75)
    plan = _plan("deepseek_v2", ratio=0.5)
    assert [sum(i < 4 for i in lp.keep) for lp in plan.layers] == [2, 2]
    with pytest.raises(MoeSlimError, match="impossible"):  # top-2 from 1 group of 1 expert
        _plan("deepseek_v2", ratio=0.75)


def test_plan_json_round_trip_and_validation(tmp_path) -> None:
    plan = _plan("qwen3_moe", ratio=0.5, info={"criterion": "reap"})
    plan.save(tmp_path / "plan.json")
    back = ExpertPlan.load(tmp_path / "plan.json")
    assert back == plan
    cfg = tiny_config("qwen3_moe")
    with pytest.raises(MoeSlimError, match="other MoE layers"):
        back.validate(family_of(cfg), cfg, ["a", "b"])
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(MoeSlimError, match="not a moe_slim expert plan"):
        ExpertPlan.load(tmp_path / "bad.json")
