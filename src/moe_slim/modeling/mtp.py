"""Multi-token-prediction (MTP, next-n) layers: found on disk, grafted into the model, run as the family runs them.

DeepSeek-V3, GLM-4.5, Qwen3-Next and others store next-token-prediction layers in their checkpoints
that a plain ``from_pretrained`` skips (the model class lists them in
``_keys_to_ignore_on_load_unexpected``); serving engines load them for speculative decoding. Their
MoE blocks are MoE layers of the checkpoint like any other, so moe_slim grafts them into the model:

* **Which tensors.** The model's own ``_keys_to_ignore_on_load_unexpected`` patterns that name MTP
  weights: those mentioning ``mtp``/``nextn``, and those naming a layer past the model's last
  (``model\\.layers\\.61.*`` for DeepSeek-V3). A layer number in a pattern is the published model's
  layer count, so it is read as "layers from ``num_hidden_layers`` on", as transformers' own
  ``MtpModel.get_weight_conversions`` numbers them; patterns naming a layer the model has are skipped,
  as transformers' ``MtpModel.get_mtp_weights_regex`` skips them.
* **Which modules.** Each MTP depth's decoder layer (``model.layers.61``, ``mtp.layers.0``) is an
  instance of the model's own decoder-layer class, built from ``config.get_mtp_config()`` where
  transformers has one, placed where its on-disk name says (appended to the layer list, which the
  model's forward never reaches past ``num_hidden_layers``, or under a new ``mtp`` module). Every
  other MTP tensor becomes a parameter at its on-disk path; transformers' ``MtpModel`` conversion
  table says which of them are the embedding norm, hidden norm, input projection and output norm.
  So state-dict names are the on-disk names: the conversion tables, streaming rewrites, in-memory
  saves and :func:`moe_slim.families.moe_layers` treat MTP layers like the others.
* **The forward** (:func:`moe_slim.modeling.mtp_forward.mtp_step`) is transformers' ``MtpLayer.forward``:
  ``eh_proj(cat(enorm(embed(t+1)), hnorm(h_t)))`` through the decoder layer, then the output norm; ``h_t`` is
  the main model's final (normed) hidden state, as ``generate(use_mtp=True)`` passes it, and depth ``k``
  reads token ``t+k+1``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MoeSlimError
from ..families import family_of, get_path

ROLES = ("enorm", "hnorm", "eh_proj", "post_norm")
_NUMBERED = re.compile(r"layers\\?\.(\d+)")  # a layer number inside a pattern's text
_DEPTH = re.compile(r"^(.*?layers\.(\d+))\.")  # the decoder-layer prefix of an on-disk MTP key
_COUNT_KEY = re.compile(r"(mtp|nextn).*layers|layers.*(mtp|nextn)")


@dataclass
class MtpDepth:
    """One MTP depth: where its decoder layer and its extra modules sit in the model."""

    prefix: str  # module path of the decoder layer (= its on-disk prefix)
    roles: dict[str, str] = field(default_factory=dict)  # "enorm" | "hnorm" | "eh_proj" | "post_norm" -> module path


@dataclass
class MtpLayers:
    """The MTP layers grafted into a model (``model.moe_slim_mtp``)."""

    keys: list[str]  # their on-disk tensor names
    depths: list[MtpDepth]
    roots: list[str]  # top-level module paths that hold them (what to load, unload or drop)
    hidden_first: bool = False  # the projection reads [hnorm(h), enorm(e)] (transformers' mtp_hidden_states_first)
    unplaced: str = ""  # why the MTP tensors could not be grafted (then there are no depths)
    config: Any = None  # the config the MTP decoder layers were built from (its layer types, for masks and rope)

    def check_writable(self, where: str) -> None:
        """A one-line error when an output would keep MTP tensors moe_slim could not place (and so not slice)."""
        if self.unplaced:
            raise MoeSlimError(f"{where} stores MTP layers ({self.keys[0]}, ...) that moe_slim cannot slice with the "
                               f"model: {self.unplaced}; write the output without them with --drop-mtp")

    def layer_names(self) -> list[str]:
        return [d.prefix for d in self.depths]


def num_main_layers(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_hidden_layers"))


def ignore_patterns(model: nn.Module) -> list[str]:
    """The ``_keys_to_ignore_on_load_unexpected`` patterns of the model and its sub-models (some set per instance)."""
    from transformers import PreTrainedModel

    out: list[str] = []
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            out += [p for p in (m._keys_to_ignore_on_load_unexpected or []) if p not in out]
    return out


def mtp_patterns(model: nn.Module) -> list[re.Pattern]:
    """Regexes of on-disk MTP tensor names for this model (see the module docstring)."""
    return mtp_regexes(ignore_patterns(model), num_main_layers(model.config))


def mtp_regexes(patterns: list[str], n: int) -> list[re.Pattern]:
    """The MTP patterns among a model class's ``_keys_to_ignore_on_load_unexpected``, for a model of ``n``
    layers: a numbered layer is captured as group ``mtp_index`` and counts only from ``n`` on."""
    out = []
    for p in patterns:
        m = _NUMBERED.search(p)
        if m is not None:
            if int(m.group(1)) < n:
                continue  # a layer this model has (GLM-4.5's 46 in the 92-layer model)
            p = p[: m.start(1)] + r"(?P<mtp_index>\d+)" + p[m.end(1):]
        elif not re.search(r"mtp|nextn", p, re.IGNORECASE):
            continue  # not an MTP pattern (e.g. a vision tower)
        out.append(re.compile(p))
    return out


def is_mtp_key(key: str, patterns: list[re.Pattern], n_main: int) -> bool:
    for pat in patterns:
        m = pat.search(key)
        if m is not None and ("mtp_index" not in pat.groupindex or int(m.group("mtp_index")) >= n_main):
            return True
    return False


def count_key(config: Any) -> str | None:
    """The config key holding the number of MTP layers (transformers' ``num_mtp_layers`` alias resolved)."""
    aliases = getattr(config, "attribute_map", {}) or {}
    if "num_mtp_layers" in aliases:
        return aliases["num_mtp_layers"]
    keys = [k for k, v in config.to_dict().items() if _COUNT_KEY.search(k) and isinstance(v, int)
            and not isinstance(v, bool)]
    return keys[0] if keys else None


def _role_of(key: str, prefix: str, depth: int) -> str | None:
    """Which MtpLayer part an extra MTP tensor is, by transformers' ``MtpModel`` conversion table."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    table = get_checkpoint_conversion_mapping("MtpModel") or []
    renamings = [WeightRenaming(source_patterns=f"{prefix}.", target_patterns=f"layers.{depth}.mtp_block.")]
    renamings += [t for t in table if isinstance(t, WeightRenaming)]
    name, _ = rename_source_key(key, renamings, [])
    m = re.match(r"^layers\.(\d+)\.(" + "|".join(ROLES) + r")\.", name)
    return m.group(2) if m and int(m.group(1)) == depth else None


class _Holder(nn.Module):
    """A parameter an MTP layer stores but moe_slim never runs (its copy of the embedding or head)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)


def _ensure_path(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path``, creating empty containers along the way."""
    obj = model
    for part in path.split(".") if path else []:
        child = obj._modules.get(part)
        if child is None:
            child = nn.Module()
            obj.add_module(part, child)
        obj = child
    return obj


def mtp_config(config: Any, n: int, moe_type: str | None = None) -> Any:
    """The config MTP decoder layers are built from: transformers' ``get_mtp_config`` (layer-indexed fields
    replaced by their ``mtp_*`` versions, every layer MoE). A family whose config has no MTP fields gets
    transformers' defaults for them: ``num_mtp_layers = n``, full-attention layers (what ``MtpModel`` masks
    for when a config names no MTP layer types), and MoE MLPs (``moe_type``: what ``mlp_layer_types`` calls
    the main model's MoE layers)."""
    missing = {"num_mtp_layers": n} if getattr(config, "num_mtp_layers", None) is None else {}
    if getattr(config, "layer_types", None) is not None and getattr(config, "mtp_layer_types", None) is None:
        missing["mtp_layer_types"] = ["full_attention"] * n
    if getattr(config, "mlp_layer_types", None) is not None and getattr(config, "mtp_mlp_layer_types", None) is None \
            and moe_type is not None:
        missing["mtp_mlp_layer_types"] = [moe_type] * n
    if missing:
        config = copy.deepcopy(config)
        for key, value in missing.items():
            setattr(config, key, value)
    try:
        return config.get_mtp_config()
    except ValueError as exc:  # e.g. per-layer MLP types without their MTP version
        raise MoeSlimError(f"cannot build the MTP layers of this {config.model_type} model: {exc}") from None




def _moe_mlp_type(model: nn.Module) -> str | None:
    """What the config's ``mlp_layer_types`` calls a layer with a MoE block (``sparse``, ``moe``...)."""
    from ..families import moe_layers

    types = getattr(model.config, "mlp_layer_types", None)
    stack = family_of(model).layer_stacks[-1]
    for layer in moe_layers(model) if types is not None else []:
        index = layer.name[len(stack) + 1:].split(".", 1)[0] if layer.name.startswith(stack + ".") else ""
        if index.isdigit() and int(index) < len(types):
            return types[int(index)]
    return None


def _last_layer_class(model: nn.Module) -> type:
    stack = get_path(model, family_of(model).layer_stacks[-1])
    if not isinstance(stack, nn.ModuleList) or not len(stack):
        raise MoeSlimError(f"cannot find the decoder layers of this {family_of(model).name} model to build MTP layers")
    return type(stack[0])


def _extra_module(role: str | None, shape: tuple[int, ...], model: nn.Module, norm_cls: type) -> nn.Module:
    if role in ("enorm", "hnorm", "post_norm") and len(shape) == 1:
        eps = getattr(model.config, "rms_norm_eps", 1e-6)
        return norm_cls(shape[0], eps=eps)
    if role == "eh_proj" and len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=False)
    return _Holder(shape)


def attach_mtp(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> MtpLayers | None:
    """Graft the MTP layers whose tensors are in ``shapes`` (on-disk name -> shape) into ``model``.

    Returns what was grafted (also kept as ``model.moe_slim_mtp``), or None when the checkpoint has no
    MTP tensors. Parameters are created on the meta device: load them from the checkpoint
    (:func:`attach_from_checkpoint`, :func:`load_mtp`) or leave them there (a skeleton). MTP tensors in a
    layout moe_slim cannot place are recorded (``unplaced``), not grafted."""
    existing = getattr(model, "moe_slim_mtp", None)
    if existing is not None:
        return existing
    try:
        family_of(model)
    except MoeSlimError:
        return None  # a dense model's MTP layers are not moe_slim's to slim
    n_main = num_main_layers(model.config)
    pats = mtp_patterns(model)
    keys = [k for k in shapes if is_mtp_key(k, pats, n_main)]
    if not keys:
        return None
    try:
        info = _graft(model, keys, shapes)
    except MoeSlimError as exc:  # an MTP layout moe_slim does not know: refused when writing, unless dropped
        info = MtpLayers(keys, [], [], unplaced=str(exc))
    object.__setattr__(model, "moe_slim_mtp", info)  # not a module: never in state_dict, deep-copied along
    return info


def _graft(model: nn.Module, keys: list[str], shapes: dict[str, tuple[int, ...]]) -> MtpLayers:
    from accelerate import init_empty_weights

    prefixes = sorted({m.group(1) for k in keys if (m := _DEPTH.match(k))}, key=lambda p: int(p.rsplit(".", 1)[1]))
    if not prefixes:
        raise MoeSlimError("they hold no decoder layer under a layers.N name")
    depths: list[MtpDepth] = []
    norm_cls = None
    config = mtp_config(model.config, len(prefixes), _moe_mlp_type(model))
    with init_empty_weights():  # no memory until loaded: a real MTP layer is as large as any other
        for k, prefix in enumerate(prefixes):
            parent, idx = prefix.rsplit(".", 1)
            layer = _last_layer_class(model)(config, k)  # as transformers' MtpModel builds depth k
            holder = get_path(model, parent)
            if isinstance(holder, nn.ModuleList):
                if len(holder) != int(idx):
                    raise MoeSlimError(f"{prefix} does not follow the model's {len(holder)} layers")
                holder.append(layer)
            else:
                _ensure_path(model, parent).add_module(idx, layer)
            norm_cls = norm_cls or next(type(m) for n, m in layer.named_modules() if "norm" in n)
            depths.append(MtpDepth(prefix))
        state = model.state_dict()
        fits = _fits(model, state)
        own = {d.prefix: set(dict(model.get_submodule(d.prefix).named_children())) for d in depths}  # before extras
        for key in keys:
            if fits(key):
                continue
            k = next((i for i, d in enumerate(depths) if key.startswith(d.prefix + ".")), 0)
            part = key[len(depths[k].prefix) + 1:].split(".", 1)[0] if key.startswith(depths[k].prefix + ".") else ""
            if part in own[depths[k].prefix]:
                continue  # beside the layer's own weights (FP8 block scales): the on-disk layout places it
            path = key.rsplit(".", 1)[0]
            role = _role_of(key, depths[k].prefix, k)
            parent, _, leaf = path.rpartition(".")
            if get_path(model, path) is None:
                _ensure_path(model, parent).add_module(leaf, _extra_module(role, shapes[key], model, norm_cls))
            if role is not None:
                depths[k].roles[role] = path
    tops = {d.prefix for d in depths} | {k.split(".", 1)[0] for k in keys
                                         if not any(k.startswith(d.prefix + ".") for d in depths)}
    roots = sorted(r for r in tops if not any(r.startswith(t + ".") for t in tops))  # mtp.layers.0 is under mtp
    return MtpLayers(keys, depths, roots, bool(getattr(model.config, "mtp_hidden_states_first", False)),
                     config=config)


def _fits(model: nn.Module, state: dict[str, Any]) -> Any:
    """Whether an on-disk key feeds a parameter the model (with its grafted decoder layers) already has,
    by transformers' conversion tables."""
    from transformers.core_model_loading import rename_source_key

    from .ondisk import _transforms

    renamings, converters = _transforms(model)
    return lambda key: rename_source_key(key, renamings, converters, model.base_model_prefix, state)[0] in state


def mtp_of(model: nn.Module) -> MtpLayers | None:
    return getattr(model, "moe_slim_mtp", None)


def check_mtp_writable(model: nn.Module, where: Any, drop: bool) -> None:
    """Refuse (one line) to write an output that would keep MTP tensors moe_slim could not slice."""
    info = mtp_of(model)
    if info is not None and not drop:
        info.check_writable(str(where))


def checkpoint_skeleton(config: Any, source: Any) -> nn.Module:
    """:func:`~.ondisk.meta_model` with the MTP layers the checkpoint at ``source`` stores grafted in: a
    skeleton with every MoE layer of the checkpoint."""
    from .ondisk import meta_model

    model = meta_model(config)
    attach_from_checkpoint(model, source)
    return model


def attach_from_checkpoint(model: nn.Module, path: Any, load: bool = False) -> MtpLayers | None:
    """:func:`attach_mtp` with the tensors of the checkpoint at ``path``; ``load`` reads their values too."""
    from .shards import ShardedCheckpoint, has_safetensors

    if not has_safetensors(path):
        return None
    ckpt = ShardedCheckpoint(path)
    info = attach_mtp(model, {k: ckpt.entry(k).shape for k in ckpt.keys})
    if info is not None and load:
        from .materialize import WeightSource

        source = WeightSource(path, model)
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        for root in info.roots:
            source.load(root, device, dtype)
    return info


def load_mtp(source: Any, device: torch.device | str, dtype: torch.dtype | None) -> None:
    """Read the grafted MTP layers of ``source.model`` (a WeightSource) from the shards, but not their copies
    of the embedding and head, which moe_slim never runs."""
    info = mtp_of(source.model)
    if info is None:
        return
    holders = tuple(n for n, m in source.model.named_modules() if isinstance(m, _Holder))
    for root in info.roots:
        source.load(root, device, dtype, exclude=holders)


def unload_mtp(source: Any) -> None:
    info = mtp_of(source.model)
    for root in info.roots if info is not None else []:
        source.unload(root)


def drop_mtp(model: nn.Module) -> list[str]:
    """Remove the grafted MTP layers (``--drop-mtp``) and set the config's MTP count to 0; return their names."""
    set_mtp_count(model.config, 0)
    info = mtp_of(model)
    if info is None:
        return []
    for root in sorted(info.roots, key=lambda r: -int(r.rsplit(".", 1)[1]) if r.rsplit(".", 1)[-1].isdigit() else 0):
        parent, _, leaf = root.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, nn.ModuleList):
            del owner[int(leaf)]
        else:
            delattr(owner, leaf)
    object.__delattr__(model, "moe_slim_mtp")
    return info.layer_names()


def set_mtp_count(config: Any, n: int) -> None:
    """Write the number of MTP layers into the config (where it has a key for it)."""
    key = count_key(config)
    if key is not None:
        setattr(config, key, n)


def main_layer_count(stack: nn.ModuleList, model: nn.Module) -> int:
    """How many layers of ``stack`` the model's forward runs (grafted MTP layers excluded)."""
    info = mtp_of(model)
    if info is None:
        return len(stack)
    mine = {id(model.get_submodule(d.prefix)) for d in info.depths}
    return sum(1 for m in stack if id(m) not in mine)


def mtp_layer_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Which of the MoE layer ``names`` sit inside MTP layers."""
    info = mtp_of(model)
    if info is None:
        return []
    return [n for n in names if any(n.startswith(d.prefix + ".") for d in info.depths)]
