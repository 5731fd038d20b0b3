"""Observing MTP layers: each depth runs after the main model, as the family runs it when drafting.

Depth ``k`` reads, at position ``t``, the token ``t + k + 1`` and the hidden state at ``t`` of the
depth before it (depth 0: the main model's final hidden state) (:func:`moe_slim.modeling.mtp.mtp_step`).
So an MTP layer's router statistics come from its own inputs, not from the last layer's. Only positions
whose token ``t + k + 1`` is real text count (the recorder's mask is shifted for the depth).

Where a family's MTP forward cannot be reproduced (a layout without the projection moe_slim knows), the
depth is not run, its statistics stay empty, and planning gives it the experts the last main MoE layer
keeps (:func:`moe_slim.experts.mtp_plan.cover_mtp_layers`); a note says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..modeling.mtp import mtp_of
from ..modeling.mtp_forward import mtp_step, shifted
from ..outputs import note
from .batches import Batch
from .recorder import Recorder

_NEEDED = ("enorm", "hnorm", "eh_proj")


def runnable_depths(model: nn.Module) -> int:
    """How many MTP depths moe_slim can run (0 without MTP layers); a note for the others."""
    info = mtp_of(model)
    if info is None:
        return 0
    for k, d in enumerate(info.depths):
        if any(r not in d.roles for r in _NEEDED):
            note(f"the MTP layer {d.prefix} has no {'/'.join(r for r in _NEEDED if r not in d.roles)} moe_slim can "
                 "run, so it is not observed: it keeps the experts the last MoE layer keeps")
            return k
    return len(info.depths)


@contextlib.contextmanager
def final_hidden(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the main model's final (normed) hidden state of every forward under ``["h"]``."""
    box: dict[str, torch.Tensor] = {}
    base = model.get_decoder() if hasattr(model, "get_decoder") else model

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        box["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = base.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def observe_depth(model: nn.Module, k: int, batch: Batch, previous: torch.Tensor,
                  recorder: Recorder | None) -> torch.Tensor:
    """Run MTP depth ``k`` on ``batch`` (hooks record its MoE layer) and return its output hidden state."""
    ids = batch.input_ids.to(previous.device)
    mask = batch.attention_mask.to(previous.device)
    nxt, valid = shifted(ids, mask, k + 1)
    positions = (torch.arange(ids.shape[1], device=ids.device) + k + 1).expand(ids.shape[0], -1)
    if recorder is not None:
        saved = recorder.masks
        recorder.masks = {"decoder": valid.reshape(-1), "encoder": valid.reshape(-1)}
    try:
        return mtp_step(model, k, previous, nxt, mask, positions)
    finally:
        if recorder is not None:
            recorder.masks = saved


def observe_depths(model: nn.Module, batch: Batch, hidden: torch.Tensor, recorder: Recorder | None,
                   depths: int) -> torch.Tensor:
    """Every runnable depth in turn, from the main model's final hidden state."""
    for k in range(depths):
        hidden = observe_depth(model, k, batch, hidden, recorder)
    return hidden
