"""moe_slim's dispatch for module-style experts (Switch Transformers, NLLB-MoE).

Every expert with a non-zero combine weight runs, and a recorder attached to the experts module
(:mod:`moe_slim.experts.recorder`) sees each selection as it happens.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from ..errors import MoeSlimError
from ..families import MoeLayer, family_of, moe_layers


def module_experts_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of module-style experts (``expert_{i}``) from the router's dense combine weights.

    Installed on Switch/NLLB experts by :func:`prepare_model`; records when a recorder is attached.
    """
    layer: MoeLayer = self._moe_slim_layer
    hidden, combine = layer.family.combine(self, args, kwargs)
    final = torch.zeros_like(hidden)
    novices = getattr(self, "_moe_slim_novices", None)  # MoNE: (bool [E], constants [E, H]) from experts.mone
    if novices is not None:
        w_nov = combine * novices[0].to(combine.device, combine.dtype)
        combine = combine - w_nov
        final += (w_nov.float() @ novices[1].to(hidden.device).float()).to(final.dtype)
    tok, exp = (combine != 0).nonzero(as_tuple=True)
    norms = torch.zeros(tok.shape[0], dtype=torch.float32, device=hidden.device)
    recorder = getattr(self, "_moe_slim_recorder", None)  # a moe_slim.experts.recorder.Recorder, when observing
    outs = torch.zeros(tok.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device) if recorder is not None else None
    for e in torch.unique(exp).tolist():
        sel = (exp == e).nonzero(as_tuple=True)[0]
        rows = tok[sel]
        out = self[f"expert_{e}"](hidden[rows])
        norms[sel] = out.detach().float().norm(dim=-1)
        if outs is not None:
            outs[sel] = out.detach().float()
        final.index_add_(0, rows, (out * combine[rows, e, None].to(out.dtype)).to(final.dtype))
    if recorder is not None:
        recorder.record_pairs(layer, tok, exp, combine[tok, exp].detach().float(), norms, hidden.shape[0], outs)
    return final


def prepare_model(model: nn.Module) -> nn.Module:
    """Install moe_slim's dispatch on module-style experts (a no-op for fused families and dense models)."""
    try:
        family = family_of(model)
    except MoeSlimError:
        return model
    if family.layout != "modules":
        return model
    for layer in moe_layers(model):
        experts = layer.experts
        experts._moe_slim_layer = layer
        if getattr(experts, "_moe_slim_prepared", False):
            continue
        experts.forward = types.MethodType(module_experts_forward, experts)
        experts._moe_slim_prepared = True
    return model
