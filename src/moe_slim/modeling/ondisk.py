"""Which tensor on disk is which part of the model, without loading the model.

transformers 5 keeps MoE experts fused in memory (``experts.gate_up_proj[E, 2I, H]``) but saves
most families per expert (Qwen3-MoE ``experts.{e}.gate_proj.weight``, Mixtral
``block_sparse_moe.experts.{e}.w1.weight``); GPT-OSS stays fused on disk, GraniteMoE renames
(``input_linear.weight``). Rather than regexes of our own, the mapping comes from transformers'
own weight-conversion tables (``get_model_conversion_mapping`` / ``rename_source_key``, what
``from_pretrained`` uses), applied to a weightless skeleton of the model (meta device). The family
table adds the one thing those tables do not say: where an expert's number sits in an on-disk
name (:attr:`moe_slim.families.Family.disk_expert_index`).

The same tables convert both ways: :meth:`DiskLayout.assemble` turns on-disk tensors into the
in-memory ones (per-expert tensors stacked, gate and up concatenated) and :meth:`DiskLayout.to_disk`
turns in-memory tensors back (transformers' ``revert_weight_conversion``, what ``save_pretrained``
uses), so a part of a model can be loaded and written back without the rest.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import MoeSlimError
from ..families import MoeLayer, moe_layers, skeleton


def meta_model(config: Any) -> nn.Module:
    """A skeleton of the model with every parameter on the meta device: names and shapes, no memory."""
    return skeleton(config)


def quant_method(config: Any) -> str | None:
    """``quantization_config.quant_method`` of a config (None when the checkpoint is not quantized)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else "unknown"


@dataclass(frozen=True)
class DiskTensor:
    """One on-disk tensor and what it is in the model."""

    key: str  # name in the checkpoint
    memory_key: str  # the in-memory parameter (or buffer) it feeds
    pattern: str | None  # the transformers converter source pattern that matched (None: renamed only)
    layer: int | None  # index of the MoE layer (moe_layers order) it belongs to
    role: str  # "expert" | "router" | "other" (attention, norms, shared experts, ...)
    expert: int | None = None  # per-expert tensors: the expert's number in the on-disk name
    span: tuple[int, int] | None = None  # where that number sits in ``key``

    def renumbered(self, new: int) -> str:
        """The on-disk name of this per-expert tensor for expert number ``new``."""
        assert self.span is not None
        return f"{self.key[: self.span[0]]}{new}{self.key[self.span[1]:]}"


def _transforms(model: nn.Module) -> tuple[list[Any], list[Any]]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError as exc:  # a transformers without the 5.x conversion tables
        raise MoeSlimError(f"this transformers has no weight-conversion tables ({exc}); install transformers 5.x") from exc
    transforms = get_model_conversion_mapping(model, add_legacy=True)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _memory_key(key: str, renamings: list[Any], converters: list[Any], model: nn.Module,
                state: dict[str, Any]) -> tuple[str, str | None]:
    """The in-memory name of on-disk ``key`` and the converter pattern that matched, as ``from_pretrained``
    decides it: a renaming that leads to no parameter is not applied where the key itself is one
    (DeepSeek-V4's ``\\.norm\\.`` -> ``.kv_norm.`` would otherwise take ``model.norm.weight``)."""
    from transformers.core_model_loading import rename_source_key

    mkey, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
    if mkey not in state and key in state:
        return rename_source_key(key, [], [], model.base_model_prefix, state)
    return mkey, pattern


class DiskLayout:
    """The on-disk tensors of a checkpoint, each mapped to the model part it belongs to."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        self.model = model
        self.layers: list[MoeLayer] = moe_layers(model)
        self.family = self.layers[0].family
        self._renamings, self._converters = _transforms(model)
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        state = model.state_dict()
        index_re = re.compile(self.family.disk_expert_index)
        experts_at = {f"{l.name}.{self.family.experts_attr}.": l.index for l in self.layers}
        router_at = {f"{l.name}.{self.family.router_attr}.": l.index for l in self.layers}
        # every other tensor of a block that runs over its experts (MiniMax-M2's correction bias on the block)
        sliced = {f"{l.name}.{path}": l.index for l in self.layers for path in l.per_expert()
                  if not path.startswith(f"{self.family.experts_attr}.")}
        self.tensors: dict[str, DiskTensor] = {}
        for key in keys:
            mkey, pattern = _memory_key(key, self._renamings, self._converters, model, state)
            layer, role, expert, span = None, "other", None, None
            for prefix, li in experts_at.items():
                if mkey.startswith(prefix):
                    m = list(index_re.finditer(key))
                    if m:
                        expert, span = int(m[-1].group(1)), m[-1].span(1)
                    elif "." in mkey[len(prefix):] and not self.family.flat_experts:  # a module inside the experts
                        # that is no expert (Muse Spark's norm); flat experts (DBRX) sit in a sub-module
                        break
                    layer, role = li, "expert"
                    break
            else:
                if mkey in sliced:
                    layer, role = sliced[mkey], "router"
                for prefix, li in router_at.items():
                    if mkey.startswith(prefix):
                        layer, role = li, "router"
                        break
            self.tensors[key] = DiskTensor(key, mkey, pattern, layer, role, expert, span)

    def of_layer(self, index: int, roles: tuple[str, ...] = ("expert", "router")) -> list[DiskTensor]:
        return [t for t in self.tensors.values() if t.layer == index and t.role in roles]

    def under(self, module_name: str) -> list[DiskTensor]:
        """The on-disk tensors that feed parameters under the in-memory module ``module_name``."""
        prefix = module_name + "."
        return [t for t in self.tensors.values() if t.memory_key.startswith(prefix)]

    def assemble(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On-disk tensors -> the in-memory tensors they make (every member of a fused group must be given).

        Consumes ``tensors``: the pieces of a fused tensor are popped as they go to the converter."""
        out: dict[str, torch.Tensor] = {}
        groups: dict[str, list[DiskTensor]] = {}
        for key in tensors:
            d = self.tensors[key]
            if d.pattern is None:
                out[d.memory_key] = tensors[key]
            else:
                groups.setdefault(d.memory_key, []).append(d)
        for mkey, members in groups.items():
            conv = copy.deepcopy(self._by_pattern[members[0].pattern])
            for d in sorted(members, key=lambda d: (d.expert if d.expert is not None else -1, d.key)):
                conv.add_tensor(mkey, d.key, d.pattern, tensors.pop(d.key))  # the converter frees what it consumes
            result = conv.convert(mkey, model=self.model, config=self.model.config)
            for name, value in result.items():
                out[name] = value[0] if isinstance(value, list) else value
        return out

    def to_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In-memory tensors -> their on-disk names and layout (what ``save_pretrained`` writes)."""
        from transformers.core_model_loading import revert_weight_conversion

        # A Transpose(check_dims=True) compares a tensor with the model's parameter of that name, which has
        # the source's expert count: a merged layer's fewer experts would read as "transposed". Compared
        # with itself instead, it is written as save_pretrained writes the merged model in memory.
        model, own = self.model, self.model.get_parameter
        model.get_parameter = lambda name: tensors[name] if name in tensors else own(name)  # type: ignore[method-assign]
        try:
            return revert_weight_conversion(model, dict(tensors))
        finally:
            del model.get_parameter


def source_dtypes(model: nn.Module, path: Any, floating: bool = True) -> dict[str, torch.dtype]:
    """The dtype each in-memory tensor of ``model`` has in the checkpoint at ``path`` (its state-dict
    names; the on-disk tensors that feed one fused tensor give the widest of their dtypes); with
    ``floating=False`` the same for the integer tensors (DeepSeek-V4's token tables)."""
    from .shards import FLOATING, TORCH_DTYPES, ShardedCheckpoint

    ckpt = ShardedCheckpoint(path)
    renamings, converters = _transforms(model)
    state = model.state_dict()
    out: dict[str, torch.dtype] = {}
    for key in ckpt.keys:
        stored = ckpt.entry(key).dtype
        if (stored in FLOATING) != floating or stored not in TORCH_DTYPES:
            continue
        mkey, _ = _memory_key(key, renamings, converters, model, state)
        dtype = TORCH_DTYPES[stored]
        if mkey not in out or dtype.itemsize > out[mkey].itemsize:
            out[mkey] = dtype
    return out


def cast_like_source(model: nn.Module, path: Any) -> None:
    """Cast every floating tensor of ``model`` to its dtype in the source checkpoint at ``path`` (tensors
    the source lacks, such as new or tied ones, to its most common floating dtype). Quantized (8-bit)
    tensors stay as they are."""
    from .shards import ShardedCheckpoint

    dominant = ShardedCheckpoint(path).dominant_float_dtype()
    if dominant is None:
        return
    wanted = source_dtypes(model, path)
    saved = set(model.state_dict())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        dtype = wanted.get(name, dominant)
        if name in saved and t.is_floating_point() and t.dtype.itemsize > 1 and t.dtype != dtype:
            t.data = t.data.to(dtype)
    buffers = dict(model.named_buffers())
    for name, dtype in source_dtypes(model, path, floating=False).items():  # index tables: int64 loaded, int32 stored
        t = buffers.get(name)
        if t is not None and not t.is_floating_point() and not dtype.is_floating_point and t.dtype != dtype:
            t.data = t.data.to(dtype)
