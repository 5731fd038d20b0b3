"""MoNE (Mixture of Novices and Experts, Zhang et al., ICLR 2026): keep the experts that matter and
replace every other one by a "novice", the constant vector that is its mean output.

A novice keeps its router row: the router still picks it and still weighs it, and instead of running
an expert the layer adds ``weight * constant``. The constant is the expert's mean (unweighted) output
over the tokens routed to it, an unbiased estimate of what it would have returned; the ranking is the
``mone`` criterion (:mod:`moe_slim.experts.criteria`): mean routing weight per token times the spread of
the output around that mean. Both come from sums the statistics keep per domain (``out_sum``,
``out_sq_sum``, ``weight_sum``, ``count``), so any calibration mix can be re-scored without the model.

In memory (:func:`install_novices`) the experts module keeps every expert's weights and gives the
novices' routes zero weight, which computes exactly what a serving engine with constant experts does.
The checkpoint format (vLLM's expert substitution) is written by :mod:`moe_slim.checkpoint.substitution`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MoeSlimError
from ..families import Family, MoeLayer, moe_layers
from ..modeling.dispatch import prepare_model
from .criteria import novice_means
from .plan import ExpertPlan
from .stats import RouterStats


@dataclass
class NovicePlan:
    """A MoNE decision: which experts stay (``plan``, an ordinary keep-list plan) and every layer's
    novice constants (``values[layer]``: ``[E, hidden]`` float32, zero rows for the experts kept)."""

    plan: ExpertPlan
    values: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def novices(self, li: int) -> list[int]:
        keep = set(self.plan.layers[li].keep)
        return [e for e in range(self.plan.num_experts) if e not in keep]


def novice_plan(plan: ExpertPlan, stats: RouterStats, mix: dict[str, float] | None = None) -> NovicePlan:
    """The novices' constants for a keep-list ``plan`` (usually ranked by the ``mone`` criterion)."""
    means = novice_means(stats.mix(mix)).float()
    values = {}
    for li, lp in enumerate(plan.layers):
        v = means[li].clone()
        v[lp.keep] = 0
        values[li] = v
    plan.info.setdefault("method", "mone")
    return NovicePlan(plan, values)


def _fused_forward(layer: MoeLayer, inner: Any, novice: torch.Tensor, values: torch.Tensor) -> Any:
    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *a: Any, **k: Any):
        is_nov = novice.to(top_k_index.device)[top_k_index]
        w_nov = top_k_weights * is_nov.to(top_k_weights.dtype)
        out = inner(hidden, top_k_index, top_k_weights - w_nov, *a, **k)
        const = values.to(hidden.device)[top_k_index]  # [T, K, H]
        return out + (w_nov.float().unsqueeze(-1) * const).sum(1).to(out.dtype).reshape(out.shape)  # DBRX: [B, S, H]

    return forward


@torch.no_grad()
def install_novices(model: nn.Module, nplan: NovicePlan) -> nn.Module:
    """Turn the planned experts of ``model`` into novices, in place (weights stay; their routes weigh 0)."""
    prepare_model(model)
    layers = moe_layers(model)
    nplan.plan.validate(layers[0].family, model.config, [l.name for l in layers])
    for li, layer in enumerate(layers):
        novice = torch.zeros(layer.num_experts, dtype=torch.bool)
        novice[nplan.novices(li)] = True
        set_novices(layer, novice, nplan.values[li])
    model.config.moe_slim = {"plan": "mone", "novices_per_layer": [len(nplan.novices(i)) for i in range(len(layers))]}
    return model


def check_novices(family: Family) -> None:
    """Refuse families whose experts take router-scaled inputs: a novice returns ``w * c``, which
    cannot stand for ``f(w x)`` (Llama-4)."""
    if family.routing is not None:
        raise MoeSlimError(f"MoNE is not supported for {family.name}: its experts take router-scaled inputs "
                           "(f(w x)), so a novice's weighted mean output cannot stand for one")


def set_novices(layer: MoeLayer, novice: torch.Tensor, values: torch.Tensor) -> None:
    """Make experts ``novice`` (bool ``[E]``) of one layer return ``values[e]`` (``[E, hidden]``) times their weight."""
    experts = layer.experts
    check_novices(layer.family)
    if layer.num_fixed:  # LongCat's zero-computation experts (ids after the real ones) are never novices
        novice = torch.cat([novice, novice.new_zeros(layer.num_fixed)])
        values = torch.cat([values, values.new_zeros(layer.num_fixed, values.shape[-1])])
    if layer.family.layout == "modules":  # module_experts_forward reads these
        experts._moe_slim_novices = (novice, values)
        return
    inner = experts.__dict__.get("_moe_slim_inner_forward") or experts.forward
    experts._moe_slim_inner_forward = inner
    experts.forward = _fused_forward(layer, inner, novice, values)
