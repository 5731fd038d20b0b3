"""Run single experts of one layer on given inputs through the experts' own forward code.

Fused experts are called with a one-expert view; reading intermediate activations swaps the down
projection for a 0/1 selector. Module experts get a pre-hook on their down projection.
"""

from __future__ import annotations

import torch
from torch import nn

from ...families import (
    MoeLayer,
    NeuronAxis,
)
from .tensors import neuron_count


class ExpertRunner:
    """Runs single experts of one layer on given inputs through the experts' own forward code."""

    def __init__(self, layer: MoeLayer) -> None:
        self.layer = layer
        self.family = layer.family
        self.n = neuron_count(layer)
        self.device = next(layer.experts.parameters()).device

    def _probe(self, e: int, selector_start: int | None = None) -> nn.Module:
        """A one-expert view of fused experts; with a selector, the down projection copies neurons out."""
        replace = {}
        axes = self.family.neuron_axes()
        for name, p in self.layer.expert_params().items():
            t = p.detach()[e : e + 1]
            if selector_start is not None:
                if name == self.family.expert_down:
                    replace[name] = self._selector(t[0], axes[name], selector_start).unsqueeze(0)
                elif name not in axes:  # output-side bias: added after the down projection
                    replace[name] = torch.zeros_like(t)
        return self.layer.one_expert(e, replace)

    def _selector(self, down: torch.Tensor, ax: NeuronAxis, start: int) -> torch.Tensor:
        sel = torch.zeros_like(down)
        out_size = down.shape[1 - ax.axis]
        cnt = min(out_size, self.n - start)
        neurons = torch.arange(start, start + cnt, device=down.device)
        outs = torch.arange(cnt, device=down.device)
        if ax.axis == 0:
            sel[neurons, outs] = 1
        else:
            sel[outs, neurons] = 1
        return sel

    def _call_fused(self, probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.layer.expert_output(probe, x)

    @torch.no_grad()
    def output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s (unweighted) output on rows ``x`` ``[n, H]``."""
        x = x.to(self.device)
        if self.family.layout == "fused":
            return self._call_fused(self._probe(e), x)
        return self.layer.expert_module(e)(x)

    @torch.no_grad()
    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s intermediate activations (the down projection's input) on ``x``: ``[n, I]``."""
        x = x.to(self.device)
        if self.family.layout == "fused":
            parts = []
            start = 0
            while start < self.n:
                out = self._call_fused(self._probe(e, start), x)
                cnt = min(out.shape[1], self.n - start)
                parts.append(out[:, :cnt])
                start += cnt
            return torch.cat(parts, dim=1)
        module = self.layer.expert_module(e)
        owner = module.get_submodule(self.family.expert_down.rpartition(".")[0])
        seen: list[torch.Tensor] = []
        handle = owner.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            module(x)
        finally:
            handle.remove()
        return seen[0]
