"""What merging measures about experts on the token sample: frequency, REAP saliency, mean and
gated mean outputs; and, for sequential merging, the sample re-gathered through the merged layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...families import (
    MoeLayer,
)
from ...modeling.mtp import mtp_layer_names
from ..batches import run_batch, stream_offsets
from ..mtp_observe import final_hidden, observe_depths, runnable_depths
from ..recorder import Recorder, observing
from .runner import ExpertRunner

_CHUNK = 2048  # tokens per expert call when recomputing outputs


# -- features from the token sample ----------------------------------------------------------------


@torch.no_grad()
def layer_features(layer: MoeLayer, runner: ExpertRunner, sample: dict[str, torch.Tensor], *, outputs: bool,
                   tick: Callable[[int], Any] = lambda n: None) -> dict[str, torch.Tensor]:
    """Per-expert mean output, router-gated mean output, sample REAP/frequency and REAM's p²·‖f‖ saliency
    (p: the router's full normalised score): ``p2norm-all``, its mean over every sample token (the form of
    REAM's ``saliency.reap(top_k=None)``), and ``p2norm-routed``, its mean over the tokens routed to the expert
    (``top_k`` given: REAM's default; ``ream/saliency.py`` multiplies the gated output ``p·f`` by ``p`` again)."""
    x, logits, route = sample["x"], sample["logits"], sample["route"]
    n, E = route.shape  # the real experts (the logits may also score LongCat's zero experts, Zaya's skip expert)
    feats: dict[str, torch.Tensor] = {
        "frequency": (route > 0).double().sum(0) / max(n, 1),
    }
    if not outputs:
        return feats
    dev = runner.device
    scores = layer.router_scores(logits).to(dev)
    route_d = route.to(dev)
    renorm = route_d / route_d.sum(1, keepdim=True).clamp_min(1e-30)  # REAP: each token's top-k weights sum to 1
    H = x.shape[1]
    mean = torch.zeros(E, H, dtype=torch.float64, device=dev)
    gated = torch.zeros(E, H, dtype=torch.float64, device=dev)
    wnorm = torch.zeros(E, dtype=torch.float64, device=dev)
    p2norm = torch.zeros(E, dtype=torch.float64, device=dev)
    p2routed = torch.zeros(E, dtype=torch.float64, device=dev)
    for e in range(E):
        for s in range(0, n, _CHUNK):
            y = runner.output(e, x[s : s + _CHUNK]).float()
            mean[e] += y.sum(0).double()
            gated[e] += (scores[s : s + _CHUNK, e, None] * y).sum(0).double()
            norm = y.norm(dim=-1)
            wnorm[e] += (renorm[s : s + _CHUNK, e] * norm).sum().double()
            p2 = scores[s : s + _CHUNK, e].float() ** 2 * norm
            p2norm[e] += p2.sum().double()
            p2routed[e] += (p2 * (route_d[s : s + _CHUNK, e] > 0)).sum().double()
        tick(1)
    mean, gated, wnorm = mean.cpu(), gated.cpu(), wnorm.cpu()
    routed = (route > 0).double().sum(0).clamp_min(1)
    feats.update({"mean": mean / max(n, 1), "gated": gated / max(n, 1), "p2norm-all": p2norm.cpu() / max(n, 1),
                  "p2norm-routed": p2routed.cpu() / routed, "reap": wnorm / routed})
    return feats


# -- the whole model ---------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


@torch.no_grad()
def _gather_layer(model: nn.Module, layer: MoeLayer, batches: dict[str, list[Any]], cap: int) -> Any:
    """Token sample of one layer through the model as it is now; the forward stops after that layer
    (an MTP layer's sample comes from the MTP forward after the main model's)."""
    rec = Recorder([layer], layer.num_experts, samples=cap)
    depths = runnable_depths(model) if mtp_layer_names(model, [layer.name]) else 0

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        raise _StopForward

    handle = layer.block.register_forward_hook(stop)
    try:
        with observing(model, rec), final_hidden(model) as last:
            for domain, dbatches in batches.items():
                rec.begin(domain)
                for batch, offset in zip(dbatches, stream_offsets(dbatches)):
                    rec.stream_start = offset  # where the batch starts in the stream, as observation numbers it
                    try:
                        run_batch(model, batch, rec)
                        if depths:
                            observe_depths(model, batch, last["h"], rec, depths)
                    except _StopForward:
                        pass
    finally:
        handle.remove()
    return rec.sample_set()


class InMemoryLayers:
    """How :func:`~.driver.merge_model` reaches each MoE layer when the whole model is in memory:
    the weights are there already, and a sequential sample runs the model up to the layer."""

    def merges(self) -> bool:
        """Whether the opened layer must be merged once decided: the caller keeps this model, or later
        layers' samples come through the merged one. (At size, a plan's layers are merged again as the
        checkpoint is rewritten; merging them while deciding would only cost memory.)"""
        return True

    def open(self, li: int, layer: MoeLayer) -> MoeLayer:
        """The layer, with its weights (merging changes it in place)."""
        return layer

    def gather(self, model: nn.Module, layer: MoeLayer, batches: dict[str, list[Any]], cap: int) -> Any:
        """The layer's token sample through the model as it is now (earlier layers merged)."""
        return _gather_layer(model, layer, batches, cap)

    def close(self, li: int, layer: MoeLayer) -> None:
        """The layer is merged (its decisions are in the plan)."""
