"""Apply an expert plan to a model in memory: slice experts, router rows and biases.

The same plan applies to any copy of the model; no statistics are needed. After slicing, the
modules and (for plans that keep the same count in every layer) the config state the new expert
count, and top-k never exceeds the experts left.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import MoeSlimError
from ..families import (
    MoeLayer,
    family_of,
    get_path,
    moe_layers,
    set_config_counts,
    set_expert_count,
    take_experts,
)
from ..modeling.dispatch import prepare_model
from .plan import ExpertPlan
from .token_table import remapped_table, resolve_remap


def _set_path(root: nn.Module, path: str, value: torch.Tensor) -> None:
    *parents, leaf = path.split(".")
    owner: Any = root
    for part in parents:
        owner = getattr(owner, part)
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:  # a buffer
        setattr(owner, leaf, value)
    if isinstance(owner, nn.Linear) and leaf == "weight":
        owner.out_features = value.shape[0]


def slice_layer(layer: MoeLayer, keep: list[int], remap: dict[int, int] | None = None,
                experts_only: bool = False) -> None:
    """Keep only experts ``keep`` (original indices, in this order) in one MoE layer.

    Slices every tensor of the block that runs over the experts (:meth:`MoeLayer.per_expert`): fused
    expert parameters (flat ones in blocks of rows; fixed experts' rows kept last), router rows and bias,
    selection biases wherever they sit. A token-routed layer's table sends each removed expert's tokens to
    ``remap[removed]`` and is renumbered to ``keep``. ``experts_only`` (fused experts): the experts' weights
    alone, router and counts untouched (MoNE's compact layout, whose router keeps every logical expert)."""
    fam = layer.family
    idx = torch.tensor(keep, dtype=torch.long)
    n, fixed = layer.num_experts, layer.num_fixed  # before the router's rows are sliced
    if experts_only:
        for path, axis in layer.per_expert().items():
            if path.startswith(f"{fam.experts_attr}."):
                t = get_path(layer.block, path)
                _set_path(layer.block, path, take_experts(t.data, axis, idx, n, fixed))
        return
    table = layer.token_table
    if table is not None:
        _set_path(layer.block, fam.token_table, remapped_table(table, keep, remap or {}))
    if fam.layout == "modules":
        experts = layer.experts  # a ModuleDict that may hold more than experts (NLLB-MoE's token dropout)
        old = {e: layer.expert_module(e) for e in range(layer.num_experts)}
        for e in old:
            del experts[f"expert_{e}"]
        for j, e in enumerate(keep):
            experts[f"expert_{j}"] = old[e]
    for path, axis in layer.per_expert().items():
        t = get_path(layer.block, path)
        _set_path(layer.block, path, take_experts(t.data, axis, idx, n, fixed))
    set_expert_count(layer, len(keep))


def apply_plan(model: nn.Module, plan: ExpertPlan) -> nn.Module:
    """Prune ``model`` in place according to ``plan`` and return it."""
    family = family_of(model)
    prepare_model(model)
    layers = moe_layers(model)
    if plan.kind != "prune":
        raise MoeSlimError(f"this is a {plan.kind} plan; apply it with `moe-slim merge --plan`")
    n_now = {l.num_experts for l in layers}
    if n_now != {plan.num_experts}:
        raise MoeSlimError(
            f"plan was made for {plan.num_experts} experts per layer; this model has {sorted(n_now)} (make the plan on this model)"
        )
    plan.validate(family, model.config, [l.name for l in layers])
    for layer, lp in zip(layers, plan.layers):
        slice_layer(layer, lp.keep, resolve_remap(lp, plan.num_experts) if layer.token_table is not None else None)
    counts = set(plan.kept_counts)
    if len(counts) == 1:
        set_config_counts(model.config, family, counts.pop())
    model.config.moe_slim = {"plan": plan.kind, "kept_per_layer": plan.kept_counts}
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
