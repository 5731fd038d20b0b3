"""Merged MoE layers computed one at a time from the checkpoint's shards, for a streaming rewrite.

Applying a merge plan at size: the model is a meta-device skeleton; when the rewrite reaches a MoE
layer's expert or router tensors, that layer's block is read from the shards
(:class:`~moe_slim.modeling.materialize.WeightSource`), merged in float32 by the same
:func:`~.apply.merge_layer` the in-memory path uses, converted back to the on-disk names and layout
(transformers' conversion tables, :meth:`~moe_slim.modeling.ondisk.DiskLayout.to_disk`), and given
back to the meta device once the next layer is asked for. Peak memory is one layer's experts.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch

from ...errors import MoeSlimError
from ...families import moe_layers
from ...modeling.materialize import WeightSource
from ...modeling.ondisk import meta_model
from .apply import merge_layer
from .plan import MergePlan, validate_merge_plan


class MergedLayers:
    """On-disk tensors of each merged MoE layer, computed on demand, one layer held at a time."""

    def __init__(self, source: str | os.PathLike, config: object, plan: MergePlan) -> None:
        self.model = meta_model(config)
        self.layers = validate_merge_plan(plan, self.model)
        self.plan = plan
        self.source = WeightSource(source, self.model)
        self.held: tuple[int, dict[str, torch.Tensor]] | None = None
        self.computed: list[int] = []  # layer indices in the order they were merged (a repeat means re-reading)

    def tensor(self, layer: int, key: str) -> torch.Tensor:
        """The merged layer's tensor under its on-disk name ``key`` (the output's name)."""
        if self.held is None or self.held[0] != layer:
            self.held = None  # give the previous layer's memory back before reading the next
            self.held = (layer, self._merge(layer))
        try:
            return self.held[1][key]
        except KeyError:
            raise MoeSlimError(f"internal error: the merged {self.layers[layer].name} has no tensor {key}") from None

    @torch.no_grad()
    def _merge(self, li: int) -> dict[str, torch.Tensor]:
        layer, lp = self.layers[li], self.plan.layers[li]
        parent, _, attr = layer.name.rpartition(".")
        pristine = copy.deepcopy(layer.block)  # on the meta device: no memory; merging reshapes the loaded one
        self.source.load(layer.name, "cpu", torch.float32)
        try:
            perms = self.plan.permutations.get(li) if lp.permutations_sha256 else None
            merge_layer(layer, lp.groups, lp.weights, perms)
            state = {f"{layer.name}.{k}": v for k, v in layer.block.state_dict().items()}
        finally:  # the skeleton gets its unloaded block back (so a layer can be merged again), the memory goes
            setattr(self.model.get_submodule(parent) if parent else self.model, attr, pristine)
            self.layers[li] = dataclasses.replace(layer, block=pristine)
        self.computed.append(li)
        return self.source.layout.to_disk(state)


def check_layers_merged_once(merged: MergedLayers) -> None:
    """The rewrite should have merged every MoE layer exactly once (tensors of a layer stored together)."""
    n = len(moe_layers(merged.model))
    if sorted(merged.computed) != list(range(n)):
        raise MoeSlimError(f"internal error: merged layers {merged.computed} while writing, expected each of {n} once")
