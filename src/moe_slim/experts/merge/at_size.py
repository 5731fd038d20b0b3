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
from typing import Any

import torch
from torch import nn

from ...errors import MoeSlimError
from ...families import MoeLayer, moe_layers
from ...modeling.materialize import WeightSource
from ...modeling.mtp import checkpoint_skeleton, load_mtp, mtp_of, unload_mtp
from ...modeling.shards import TORCH_DTYPES
from ..layerwise import LayerwiseRunner, OutputCache
from ..mtp_observe import observe_depth
from ..observe import DEFAULT_CACHE_BYTES, _begin, calibration_items
from ..recorder import Recorder, observing
from .apply import merge_layer
from .features import InMemoryLayers
from .plan import MergePlan, validate_merge_plan


def put_back(model: nn.Module, layer: MoeLayer, block: nn.Module) -> MoeLayer:
    """Install ``block`` (an unloaded meta copy) where ``layer``'s loaded, merged block was: the
    skeleton can load that layer again, and the loaded weights go once nothing else holds them."""
    parent, _, attr = layer.name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, block)
    return dataclasses.replace(layer, block=block)


class MergedLayers:
    """On-disk tensors of each merged MoE layer, computed on demand, one layer held at a time."""

    def __init__(self, source: str | os.PathLike, config: object, plan: MergePlan,
                 dtype: torch.dtype | None = None) -> None:
        self.model = checkpoint_skeleton(config, source)
        self.layers = validate_merge_plan(plan, self.model)
        self.plan = plan
        self.source = WeightSource(source, self.model)
        self.dtype = dtype  # the output's dtype (None: each tensor keeps its on-disk dtype)
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

    def load_dtype(self, li: int) -> torch.dtype:
        """The dtype layer ``li`` is loaded in to be merged: its on-disk dtype when every expert and router
        tensor is stored in that one floating dtype and written in it too (the sums are float32 either
        way and rounded once, as the in-memory path rounds at save: identical bytes, half the memory for
        bf16); float32 otherwise (mixed or quantized tensors, or another output dtype)."""
        ck = self.source.checkpoint
        disk = {ck.entry(d.key).dtype for d in self.source.layout.of_layer(li)}
        only = TORCH_DTYPES.get(next(iter(disk))) if len(disk) == 1 else None
        if only is None or not only.is_floating_point or (self.dtype is not None and self.dtype != only):
            return torch.float32
        return only

    @torch.no_grad()
    def _merge(self, li: int) -> dict[str, torch.Tensor]:
        layer, lp = self.layers[li], self.plan.layers[li]
        pristine = copy.deepcopy(layer.block)  # on the meta device: no memory; merging reshapes the loaded one
        self.source.load(layer.name, "cpu", self.load_dtype(li))
        try:
            perms = self.plan.permutations.get(li) if lp.permutations_sha256 else None
            merge_layer(layer, lp.groups, lp.weights, perms)
            state = {f"{layer.name}.{k}": v for k, v in layer.block.state_dict().items()}
        finally:  # so a layer can be merged again
            # the merged weights go with ``held`` (``state`` shares their memory), not with the block:
            # other lists of the model's layers (the on-disk layout's) still hold this block object
            self.source.unload(layer.name)
            self.layers[li] = put_back(self.model, layer, pristine)
        self.computed.append(li)
        return self.source.layout.to_disk(state)


def check_layers_merged_once(merged: MergedLayers, expected: list[int] | None = None) -> None:
    """The rewrite should have merged every MoE layer (of ``expected``: those written) exactly once
    (tensors of a layer stored together)."""
    want = list(range(len(moe_layers(merged.model)))) if expected is None else sorted(expected)
    if sorted(merged.computed) != want:
        raise MoeSlimError(f"internal error: merged layers {merged.computed} while writing, expected each of {want} once")


class LayersFromShards(InMemoryLayers):
    """:func:`~.driver.merge_model` on a meta skeleton: each MoE layer's weights read from the shards
    when its turn comes and given back after, so deciding a merge holds one layer, not the model.

    Sequentially (REAM), a layer's sample must come through the merged layers before it: the
    calibration batches run through the model one transformer layer at a time
    (:class:`~moe_slim.experts.layerwise.LayerwiseRunner`, as layer-wise observation does), each
    layer's outputs cached for the next; a layer holding a MoE block is run once to record its
    sample, merged, and run again to give the merged outputs.
    """

    def __init__(self, source: WeightSource, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sequential: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.source, self.model = source, source.model
        self.device, self.dtype, self.sequential, self.cache_bytes = torch.device(device), dtype, sequential, cache_bytes
        self.pristine: nn.Module | None = None
        self.runner: LayerwiseRunner | None = None
        self.next = (0, 0)  # the first transformer layer (stack, index) whose outputs are not cached yet
        self.cache: OutputCache | None = None
        self.encoder: OutputCache | None = None
        self.hidden: OutputCache | None = None  # what the next MTP depth reads (the final hidden state first)

    def merges(self) -> bool:
        return self.sequential

    def open(self, li: int, layer: MoeLayer) -> MoeLayer:
        self.pristine = copy.deepcopy(layer.block)  # on the meta device: merging reshapes the loaded block
        if not self.sequential:
            self.source.load(layer.name, self.device, self.dtype)
        return layer

    def gather(self, model: nn.Module, layer: MoeLayer, batches: dict[str, list[Any]], cap: int) -> Any:
        if self.runner is None:
            self._start(batches)
        assert self.runner is not None
        depth = self._depth(layer)
        if depth is not None:
            return self._gather_mtp(layer, depth, cap)
        si, i = self._position(layer)
        self._advance((si, i))
        name, mods = self.stacks[si]
        self.source.load(f"{name}.{i}", self.device, self.dtype)
        rec = Recorder([layer], layer.num_experts, samples=cap)
        with observing(self.model, rec):
            for b, item in enumerate(self.runner.items):
                _begin(rec, item)
                self.runner.layer_outputs(si, mods, i, self.cache, b, self._encoder_out(si, b))
        return rec.sample_set()

    def close(self, li: int, layer: MoeLayer) -> None:
        depth = self._depth(layer) if self.sequential else None
        if depth is not None:  # the merged MTP depth's outputs feed the next depth
            self._close_mtp(li, layer, depth)
            return
        if self.sequential:  # the merged layer's outputs feed the next one
            si, i = self._position(layer)
            self._run(si, i)
        self.source.unload(layer.name)  # the caller still holds this block: its memory must go now
        assert self.pristine is not None
        put_back(self.model, layer, self.pristine)
        if self.sequential:
            self.source.unload(f"{self.stacks[si][0]}.{i}")

    # -- MTP layers: run after the main model, depth by depth ------------------------------------

    def _depth(self, layer: MoeLayer) -> int | None:
        info = mtp_of(self.model)
        return next((k for k, d in enumerate(info.depths) if layer.name.startswith(d.prefix + ".")), None) \
            if info is not None else None

    def _gather_mtp(self, layer: MoeLayer, k: int, cap: int) -> Any:
        assert self.runner is not None
        self._advance((len(self.stacks), 0))  # every main layer has run: the cache holds the last one's outputs
        if self.hidden is None:
            self.hidden = OutputCache(None, self.cache_bytes)
            for b in range(len(self.runner.items)):
                self.hidden.put(b, self.runner.final_hidden(self.stacks[-1][1], self.cache, b))
        load_mtp(self.source, self.device, self.dtype)
        rec = Recorder([layer], layer.num_experts, samples=cap)
        with observing(self.model, rec):
            for b, item in enumerate(self.runner.items):
                _begin(rec, item)
                observe_depth(self.model, k, item.batch, self.hidden.get(b).to(self.device), rec)
        return rec.sample_set()

    def _close_mtp(self, li: int, layer: MoeLayer, k: int) -> None:
        assert self.runner is not None and self.hidden is not None and self.pristine is not None
        new = OutputCache(None, self.cache_bytes)
        for b, item in enumerate(self.runner.items):
            new.put(b, observe_depth(self.model, k, item.batch, self.hidden.get(b).to(self.device), None))
        self.hidden = new
        unload_mtp(self.source)
        put_back(self.model, layer, self.pristine)

    # -- the layer-wise run ---------------------------------------------------------------------

    def _start(self, batches: dict[str, list[Any]]) -> None:
        self.runner = LayerwiseRunner(self.model, self.source, calibration_items(batches),
                                      device=self.device, dtype=self.dtype)
        self.stacks = self.runner.stacks()
        self.source.load_all_but(tuple(name for name, _ in self.stacks), self.device, self.dtype)

    def _position(self, layer: MoeLayer) -> tuple[int, int]:
        for si, (name, _) in enumerate(self.stacks):
            if layer.name.startswith(f"{name}."):
                return si, int(layer.name[len(name) + 1:].split(".")[0])
        raise MoeSlimError(f"internal error: {layer.name} is in none of the layer stacks")

    def _encoder_out(self, si: int, b: int) -> Any:
        return self.encoder.get(b) if si > 0 and self.encoder is not None else None

    def _run(self, si: int, i: int) -> None:
        """Every batch through transformer layer ``i`` of stack ``si`` (loaded): its outputs become the cache."""
        assert self.runner is not None
        mods = self.stacks[si][1]
        new = OutputCache(None, self.cache_bytes)
        for b in range(len(self.runner.items)):
            new.put(b, self.runner.layer_outputs(si, mods, i, self.cache, b, self._encoder_out(si, b)))
        self.cache, self.next = new, (si, i + 1)

    def _advance(self, to: tuple[int, int]) -> None:
        """Run the layers before ``to`` that have not run (dense layers between MoE layers; the encoder's end)."""
        assert self.runner is not None
        while self.next < to:
            si, i = self.next
            name, mods = self.stacks[si]
            if i >= len(mods):  # a stack is done; an encoder's output feeds the decoder from here on
                if self.runner.encdec and si == 0:
                    enc = OutputCache(None, self.cache_bytes)
                    for b in range(len(self.runner.items)):
                        enc.put(b, self.runner.encoder_output(mods, self.cache, b))
                    self.encoder, self.cache = enc, None
                self.next = (si + 1, 0)
                continue
            self.source.load(f"{name}.{i}", self.device, self.dtype)
            self._run(si, i)
            self.source.unload(f"{name}.{i}")
