"""Merge groups of experts into one: align each member's neurons to the representative, average
with the group's weights, and slice the router to the representatives' rows; replay a merge plan.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import MoeSlimError
from ...families import (
    MoeLayer,
    family_of,
    set_config_counts,
)
from ...modeling.dispatch import prepare_model
from ..prune import slice_layer
from ..token_table import merge_remap
from .plan import MergePlan, validate_merge_plan
from .tensors import expert_tensors, permute_neurons


@torch.no_grad()
def merge_layer(layer: MoeLayer, groups: list[list[int]], weights: list[list[float]],
                permutations: torch.Tensor | None = None, tied: bool = False) -> None:
    """Replace one layer's experts by ``len(groups)`` merged experts, in place.

    Merged expert ``j`` is ``sum_m weights[j][m] * align(expert groups[j][m])`` (float32 arithmetic,
    stored in the parameters' dtype); it takes the router row and bias entries of ``groups[j][0]``.
    ``permutations[e]`` is the neuron order of expert ``e`` (None: no alignment). ``tied``: as the
    HC-SMoE and M-SMoE papers do, every member takes the merged weights and the router is untouched
    (the expert count does not change; the model does not shrink). A per-expert scale on the combine
    weight (Gemma-4's ``per_expert_scale``) is folded into each member's output side first (``s f(x)``
    is ``f`` with its down projection times ``s``), so members merge as the layer weighs them; the merged
    expert's scale is then 1.
    """
    members = [m for g in groups for m in g]
    if len(set(members)) != len(members):
        raise MoeSlimError(f"merge groups of {layer.name} share experts: {groups}")
    axes = layer.family.neuron_axes()
    scale = layer.expert_scale
    out_side = {layer.family.expert_down, f"{layer.family.expert_down}_bias"}
    for grp, ws in zip(groups, weights):
        acc: dict[str, torch.Tensor] = {}
        for m, w in zip(grp, ws):
            for name, t in expert_tensors(layer, m).items():
                t = t.detach().float()
                if scale is not None and name in out_side:
                    t = t * float(scale[m])
                if permutations is not None and name in axes:
                    t = permute_neurons(t, axes[name], permutations[m])
                acc[name] = acc[name] + w * t if name in acc else w * t
        # written in place at once: an expert is in one group only, so no later group reads it; one group's
        # float32 sum is held at a time, not the whole layer's
        for m in grp if tied else grp[:1]:
            for name, t in expert_tensors(layer, m).items():
                t.data.copy_(acc[name].to(t.dtype))
            if scale is not None:
                scale.data[m] = 1.0
    if not tied:
        slice_layer(layer, [g[0] for g in groups], merge_remap(groups))


@torch.no_grad()
def apply_merge_plan(model: nn.Module, plan: MergePlan) -> nn.Module:
    """Replay a merge plan (with its permutations) on the original model, in place; no statistics needed."""
    prepare_model(model)
    layers = validate_merge_plan(plan, model)
    family = family_of(model)
    tied = bool(plan.info.get("tied"))
    for li, (layer, lp) in enumerate(zip(layers, plan.layers)):
        merge_layer(layer, lp.groups, lp.weights, plan.permutations.get(li) if lp.permutations_sha256 else None,
                    tied=tied)
    if tied:
        model.config.moe_slim = {"plan": "merge", "method": plan.info.get("method"), "tied": True}
        return model
    k = len(plan.layers[0].groups)
    set_config_counts(model.config, family, k)
    model.config.moe_slim = {"plan": "merge", "method": plan.info.get("method"), "kept_per_layer": [k] * len(layers)}
    return model
