"""The plan rule for MTP layers moe_slim could not observe: they keep the experts the last MoE layer keeps.

An MTP layer normally has statistics of its own (:mod:`moe_slim.experts.mtp_observe`). When it has none
(its family's MTP forward could not be reproduced, or a prune plan was made before moe_slim knew the
checkpoint's MTP layers), its input is closest to the last main layer's output, so it keeps the experts
that layer keeps; a note says so. Merge plans are never extended this way (merging needs the layer's
own neuron alignment): they must be made on the checkpoint with its MTP layers.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import MoeSlimError
from ..families import moe_layers
from ..modeling.mtp import mtp_layer_names
from ..outputs import note
from .plan import ExpertPlan, LayerPlan
from .stats import RouterStats


def follow_last_layer(plan: ExpertPlan, layer_names: list[str], mtp: list[str], why: str) -> ExpertPlan:
    """``plan`` with each MTP layer of ``mtp`` keeping what the last main MoE layer keeps (in place for
    layers already in the plan, appended for missing ones, in ``layer_names`` order)."""
    main = [n for n in layer_names if n not in mtp]
    by_name = {l.name: l for l in plan.layers}
    last = by_name[main[-1]]
    layers = [by_name[n] if n in by_name and n not in mtp else dataclasses.replace(last, name=n, scores=[])
              for n in layer_names]
    note(f"{why}: MTP layer{'s' if len(mtp) > 1 else ''} {', '.join(mtp)} keep{'' if len(mtp) > 1 else 's'} the experts "
         f"{main[-1]} keeps ({last.keep})")
    plan.layers = [LayerPlan(l.name, list(l.keep), list(l.scores)) for l in layers]
    plan.info["mtp_follow_last_layer"] = list(mtp)
    return plan


def unobserved_mtp(model: nn.Module, stats: RouterStats) -> list[str]:
    """MTP layers of ``model`` whose statistics saw no token in any domain."""
    names = [l.name for l in moe_layers(model)]
    mtp = mtp_layer_names(model, names)
    return [n for n in mtp if all(float(t["tokens"][names.index(n)]) == 0 for t in stats.domains.values())]


def cover_mtp(plan: ExpertPlan, model: nn.Module) -> ExpertPlan:
    """A prune plan made without ``model``'s MTP layers, extended by the rule; other plans unchanged."""
    names = [l.name for l in moe_layers(model)]
    mtp = mtp_layer_names(model, names)
    have = [l.name for l in plan.layers]
    if not mtp or have != [n for n in names if n not in mtp]:
        return plan
    if plan.kind != "prune":
        raise MoeSlimError(f"this {plan.kind} plan was made without the checkpoint's MTP layers ({', '.join(mtp)}); "
                           "make it again on this checkpoint, or write the output with --drop-mtp")
    return follow_last_layer(plan, names, mtp, "the plan names no MTP layer")
