"""Load parts of a model from its shards into a weightless skeleton, and give the memory back.

Layer-wise observation and merging at size keep one transformer layer in memory at a time: the
model is built on the meta device (:func:`moe_slim.modeling.ondisk.meta_model`), and
:class:`WeightSource` reads just the tensors a module needs from the safetensors shards, converts
them to the in-memory layout through transformers' own tables (:class:`~.ondisk.DiskLayout`) and
places them on the compute device in the compute dtype; :meth:`WeightSource.unload` returns the
module to the meta device.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import MoeSlimError
from ..families import non_text_parts
from .ondisk import DiskLayout
from .shards import ShardedCheckpoint


def _set(model: nn.Module, name: str, device: torch.device | str, value: torch.Tensor) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)


class WeightSource:
    """The safetensors shards of a checkpoint, as a source of module weights for a meta skeleton."""

    def __init__(self, path: str | os.PathLike, model: nn.Module) -> None:
        self.path = path
        self.model = model
        self.checkpoint = ShardedCheckpoint(path)
        self.layout = DiskLayout(model, self.checkpoint.keys)

    def load(self, module: str, device: torch.device | str, dtype: torch.dtype | None,
             exclude: tuple[str, ...] = ()) -> int:
        """Materialise every parameter and persistent buffer under ``module`` ("" = the whole model) except
        those under ``exclude``; floating tensors in ``dtype``. Returns the bytes placed on the device."""
        placed = self._place(module, exclude, device, dtype)
        self._check_loaded(module, exclude)
        return placed

    def load_all_but(self, stacks: tuple[str, ...], device: torch.device | str, dtype: torch.dtype | None) -> int:
        """Everything outside the layer ``stacks`` except the output head (embeddings, norms, rotary):
        what a forward needs before, between and after the layers; tied weights are tied again. An
        image-text model's vision tower and projector stay unread: calibration is text."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_name = next((n for n, m in self.model.named_modules() if head is not None and m is head), None)
        exclude = tuple(stacks) + ((head_name,) if head_name else ()) + non_text_parts(self.model)
        placed = self._place("", exclude, device, dtype)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        for name, buf in self.model.named_buffers():  # non-persistent buffers (rotary frequencies) live on the CPU
            if buf.device.type != "meta" and not any(name.startswith(f"{e}.") for e in stacks):
                _set(self.model, name, device, buf.to(dtype) if dtype is not None and buf.is_floating_point() else buf)
        self._check_loaded("", exclude)
        return placed

    def unload(self, module: str) -> None:
        """Give ``module``'s memory back: its parameters and buffers return to the meta device."""
        root = self.model.get_submodule(module)
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            if t.device.type != "meta":
                _set(self.model, f"{module}.{name}", "meta", torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def _place(self, module: str, exclude: tuple[str, ...], device: torch.device | str,
               dtype: torch.dtype | None) -> int:
        prefix = f"{module}." if module else ""
        wanted = [d for d in self.layout.tensors.values() if d.memory_key.startswith(prefix)
                  and not any(d.memory_key.startswith(f"{e}.") for e in exclude)]
        by_target: dict[str, list[str]] = {}
        for d in wanted:
            by_target.setdefault(d.memory_key, []).append(d.key)
        placed = 0
        # one in-memory tensor at a time: its on-disk pieces are read, assembled (given up as they are
        # consumed), converted and placed before the next is read, so a layer's load holds the layer
        # plus one fused tensor's pieces, not every piece and every assembled copy at once
        for keys in by_target.values():
            assembled = self.layout.assemble({k: self.checkpoint.tensor(k) for k in keys})
            while assembled:
                name, t = assembled.popitem()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                _set(self.model, name, device, t)
                placed += t.numel() * t.element_size()
                del t
        return placed

    def _check_loaded(self, module: str, exclude: tuple[str, ...]) -> None:
        root = self.model.get_submodule(module) if module else self.model
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            full = f"{module}.{name}" if module else name
            if t.device.type == "meta" and not any(full.startswith(f"{e}.") for e in exclude):
                raise MoeSlimError(f"{self.path} has no weights for {full} (the checkpoint is incomplete)")
