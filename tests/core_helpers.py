"""Test oracles for the core: a model with experts masked out of its routing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from moe_slim.experts.merge.plan import MergeLayerPlan
from moe_slim.experts.plan import ExpertPlan
from moe_slim.experts.token_table import merge_remap, remapped_table, resolve_remap
from moe_slim.families import moe_layers

MASK = -1e9  # finite: softmax gives exactly 0, sigmoid exactly 0, and no inf-inf NaNs in sparsemixer


@contextlib.contextmanager
def experts_masked(model: torch.nn.Module, plan: ExpertPlan) -> Iterator[None]:
    """Route ``model`` as if the plan's removed experts did not exist, without removing them.

    Adds a large negative number to the router logits of removed experts (and to DeepSeek-V3's
    correction bias, which selection adds to the scores), by intercepting the router's linear. A
    token-routed layer's table sends the removed experts' tokens to the plan's targets instead (what
    pruning does, without renumbering).
    """
    layers = moe_layers(model)
    masks: dict[int, torch.Tensor] = {}
    saved = []
    for layer, lp in zip(layers, plan.layers):
        table = layer.token_table
        if table is not None:
            saved.append((table, table.detach().clone()))
            remap = merge_remap(lp.groups) if isinstance(lp, MergeLayerPlan) else resolve_remap(lp, plan.num_experts)
            table.data.copy_(remapped_table(table, list(range(layer.num_experts)), remap, renumber=False))
        m = torch.zeros(layer.router_weight.shape[0])  # classes beyond the experts (LongCat's zero experts, Zaya's skip) stay
        m[: layer.num_experts] = MASK
        m[lp.keep] = 0.0
        masks[layer.router_weight.data_ptr()] = m
        cb = layer.correction_bias
        if cb is not None:
            saved.append((cb, cb.detach().clone()))
            cb.data += m
    original = F.linear

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        out = original(x, w, b)
        m = masks.get(w.data_ptr())
        return out if m is None else out + m.to(out.dtype)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original
        for cb, old in saved:
            cb.data.copy_(old)


def forward_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    kwargs = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
        if mask is not None:
            kwargs["decoder_attention_mask"] = mask
    with torch.no_grad():
        return model(**kwargs).logits


def keep_pattern(n_layers: int) -> list[list[int]]:
    """Keep 4 of 8 experts, two per group of four (valid for DeepSeek's 2 groups), varied per layer."""
    base = [[0, 1, 4, 5], [2, 3, 6, 7], [0, 2, 5, 7], [1, 3, 4, 6]]
    return [base[i % len(base)] for i in range(n_layers)]


def duplicate_experts(model: torch.nn.Module, pairs: list[list[int]]) -> None:
    """For each ``[c, d]``: expert ``d`` becomes a copy of ``c``, routed by ``c``'s router row scaled by 0.05."""
    from moe_slim.experts.merge.tensors import expert_tensors

    with torch.no_grad():
        for layer in moe_layers(model):
            for c, d in pairs:
                src, dst = expert_tensors(layer, c), expert_tensors(layer, d)
                for name in src:
                    dst[name].copy_(src[name])
                for t in (layer.router_weight, layer.router_bias, layer.correction_bias):
                    if t is not None:
                        t[d] = 0.05 * t[c]
