"""Expert plans from statistics, and plans as files: write one without a checkpoint, read one, apply one
in memory (any counts per layer)."""


from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import MoeSlimError
from ..experts.criteria import ALL_CRITERIA, score
from ..experts.merge.apply import apply_merge_plan
from ..experts.merge.plan import MergePlan
from ..experts.mtp_plan import cover_mtp, follow_last_layer, unobserved_mtp
from ..experts.plan import ExpertPlan, LayerPlan, check_ratio, make_plan
from ..experts.prune import apply_plan, count_parameters
from ..experts.stats import RouterStats
from ..experts.token_table import add_remaps
from ..families import moe_layers
from ..modeling.ondisk import meta_model
from ..outputs import atomic_dir


def plan_for(
    model: nn.Module,
    stats: RouterStats,
    *,
    criterion: str = "reap",
    ratio: float | None = None,
    mix: dict[str, float] | None = None,
    reference: dict[str, float] | None = None,
    budget: str = "uniform",
    floor: int | None = None,
    seed: int = 0,
    protect_super: bool = False,
) -> ExpertPlan:
    """Score experts on ``mix`` and turn the scores into a plan for ``model``.

    ``protect_super`` keeps every super-expert (:mod:`moe_slim.experts.superexperts`) whatever its score."""
    if criterion not in ALL_CRITERIA:
        raise MoeSlimError(f"unknown criterion '{criterion}' (choose from: {', '.join(ALL_CRITERIA)})")
    if ratio is not None:
        check_ratio(ratio)
    stats.check_model(model)
    layers = moe_layers(model)
    scores = score(stats, criterion, mix=mix, reference=reference, seed=seed)
    if protect_super:
        from ..experts.superexperts import protect_scores, super_experts

        scores = protect_scores(scores, super_experts(stats, mix))
    info = {"criterion": criterion, "mix": mix, "reference": reference, "seed": seed, **({"protect_super": True} if protect_super else {}),
            "stats_fingerprint": stats.meta.get("model_fingerprint"), "stats_domains": list(stats.domains)}
    names = [l.name for l in layers]
    plan = make_plan(scores, family=layers[0].family, config=model.config, layer_names=names,
                     ratio=ratio, budget=budget, floor=floor, info=info)
    tabled = [layer.index for layer in layers if layer.token_table is not None]
    if tabled:  # where a token-routed layer's removed experts send their tokens
        add_remaps(plan, stats.mix(mix), tabled)
    unseen = unobserved_mtp(model, stats)
    return follow_last_layer(plan, names, unseen, "no statistics of the MTP layers") if unseen else plan


def plan_parameters(config: Any, plan: ExpertPlan) -> tuple[int, int]:
    """Parameters of the model ``config`` describes before and after ``plan`` (a merge keeps as many as it
    has representatives), counted on a weightless skeleton: what a plan-only run reports
    (``num_parameters()`` of the loaded model, so MTP layers stored beside it are not counted)."""
    model = meta_model(config)
    before = count_parameters(model)
    loaded = {l.name for l in moe_layers(model)}  # MTP layers are not parameters of the loaded model
    apply_plan(model, ExpertPlan(plan.family, plan.num_experts, plan.top_k, [LayerPlan(l.name, list(l.keep))
                                                                             for l in plan.layers if l.name in loaded]))
    return before, count_parameters(model)


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``translation=3,general=1`` -> ``{"translation": 3.0, "general": 1.0}``."""
    if text is None or text == "":
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            out[name.strip()] = 1.0
            continue
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise MoeSlimError(f"mix weight '{part}' is not NAME=NUMBER") from exc
    if any(v < 0 for v in out.values()) or sum(out.values()) <= 0:
        raise MoeSlimError(f"mix weights must be non-negative and not all zero (got '{text}')")
    return out


def write_plan(plan: ExpertPlan, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """A plan without a checkpoint: ``OUT/plan.json`` (and a merge plan's permutations beside it)."""
    with atomic_dir(out, overwrite=overwrite, kind="plan") as tmp:
        plan.write_files(tmp)
    return Path(out) / "plan.json"


def load_plan(path: str | os.PathLike) -> ExpertPlan:
    """A prune or merge plan file (a merge plan with its permutations)."""
    plan = ExpertPlan.load(path)
    return MergePlan.load(path) if plan.kind == "merge" else plan


def apply_plan_file(model: nn.Module, path: str | os.PathLike) -> ExpertPlan:
    """Apply a saved prune or merge plan to ``model`` in memory (any counts per layer); return it."""
    plan = cover_mtp(load_plan(path), model)
    if plan.kind == "merge":
        apply_merge_plan(model, plan)
    else:
        apply_plan(model, plan)
    return plan
