"""Experts as tensors: each expert's parameters, its intermediate neurons as rows (whatever the
family's packing: concatenated gate/up halves, GPT-OSS's interleaved pairs), and permuting them.
"""

from __future__ import annotations

import torch

from ...families import (
    MoeLayer,
    NeuronAxis,
)

# -- experts as tensors -------------------------------------------------------------------------


def expert_tensors(layer: MoeLayer, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s parameters by name (fused: views ``p[e]``; modules: the sub-module's parameters)."""
    if layer.family.layout == "fused":
        return {name: p[e] for name, p in layer.expert_params().items()}
    return dict(layer.expert_module(e).named_parameters())


def neuron_count(layer: MoeLayer) -> int:
    fam = layer.family
    ax = fam.neuron_axes()[fam.expert_down]
    return int(expert_tensors(layer, 0)[fam.expert_down].shape[ax.axis])


def neuron_rows(t: torch.Tensor, ax: NeuronAxis, n: int) -> torch.Tensor:
    """``[n, F]``: each intermediate neuron's slice of ``t`` (both halves / both pair members together)."""
    m = t.movedim(ax.axis, 0)
    if ax.packing == "halves":
        m = m.reshape(2, n, -1).transpose(0, 1)
    elif ax.packing == "pairs":
        m = m.reshape(n, 2, -1)
    elif ax.packing:
        raise ValueError(f"unknown neuron packing {ax.packing!r}")
    return m.reshape(n, -1)


def permute_neurons(t: torch.Tensor, ax: NeuronAxis, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with its neurons in the order ``perm`` (neuron ``a`` of the result is neuron ``perm[a]``)."""
    n = perm.numel()
    perm = perm.long().to(t.device)
    if ax.packing == "halves":
        idx = torch.cat([perm, perm + n])
    elif ax.packing == "pairs":
        idx = torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    else:
        idx = perm
    return t.index_select(ax.axis, idx)


def weight_features(layer: MoeLayer, e: int, n: int | None = None) -> torch.Tensor:
    """``[I, F]`` float32: every neuron's weights (gate row, up row, down column, neuron biases)."""
    n = n or neuron_count(layer)
    tensors = expert_tensors(layer, e)
    return torch.cat([neuron_rows(tensors[name].detach().float(), ax, n)
                      for name, ax in layer.family.expert_neurons], dim=1)
