"""Find a model's MoE blocks from its module tree (the shape transformers 5 gives most families).

A MoE block is a module with two children: the experts (a module whose own parameters share a
leading dimension E, e.g. ``gate_up_proj[E, 2I, H]`` and ``down_proj[E, H, I]``, or a ``ModuleDict``
of E identical expert modules) and a router (a module holding a ``weight[E, H]``). Everything else
is read from the modules and the config: the expert count from the router's rows, top-k from the
config key whose value the router uses, the router bias beside its weight, selection-only biases
(every other tensor of the block with a leading dimension E), groups from ``n_group``/``topk_group``,
neuron layouts from the experts' ``is_transposed``/``has_gate``/``is_concatenated`` flags. The
family table (:mod:`.table`) adds what structure cannot tell. A model that does not fit is refused
in one line that names the missing piece.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import nn

from ..errors import MoeSlimError
from .family import POSITIVE_SCORES, Family, MoeLayer, NeuronAxis, expert_axis, get_path, text_config
from .table import QUIRKS, REFUSED

#: config attribute names that hold the routed expert count / top-k (aliases across families)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "moe_top_k", "num_selected_experts")


def _fused_count(module: nn.Module, fixed: int = 0) -> int | None:
    """E when the module's own parameters are experts stacked along a leading dimension E (some along
    E + ``fixed``: LongCat's gate_up_proj has rows for its zero-computation experts too)."""
    if type(module).__module__.startswith("torch."):  # Conv1d of a mamba mixer, Linear, Embedding: never experts
        return None
    params = [p for _, p in module.named_parameters(recurse=False)]
    if not any(p.dim() == 3 for p in params):
        return None
    counts = {p.shape[0] for p in params if p.dim() >= 2}
    if fixed and len(counts) == 2 and max(counts) - min(counts) == fixed:
        counts = {min(counts)}
    return counts.pop() if len(counts) == 1 and next(iter(counts)) >= 2 else None


def _flat_count(module: nn.Module, block: nn.Module) -> int | None:
    """Flat experts (family table ``flat_experts``, DBRX): E when every parameter under the module is a 2-D
    ``[E*I, H]`` matrix, E the rows of the one matrix of a sibling (the router); never a torch layer."""
    if type(module).__module__.startswith("torch."):
        return None
    params = list(module.parameters())
    rows = {p.shape[0] for p in params}
    if not params or any(p.dim() != 2 for p in params) or len(rows) != 1:
        return None
    total = rows.pop()
    for child in block.children():
        mats = [p for p in child.parameters() if p.dim() == 2]
        if child is not module and len(mats) == 1 and 2 <= mats[0].shape[0] < total and total % mats[0].shape[0] == 0:
            return int(mats[0].shape[0])
    return None


def _module_count(module: nn.Module) -> int | None:
    """E when the module is a ``ModuleDict`` of E identical expert modules (beside parameterless ones)."""
    if not isinstance(module, nn.ModuleDict):
        return None
    children = [c for c in module.children() if any(isinstance(m, nn.Linear) for m in c.modules())]
    return len(children) if len(children) >= 2 and len({type(c) for c in children}) == 1 else None


def _router_weight(module: nn.Module, n: int, known: str | None = None) -> str | None:
    """Path of the ``weight[E, H]`` inside a router: a module whose matrices all have E rows (a shared
    expert MLP has a down projection with H rows, so it is never taken for one). ``known``: the path the
    family table names for a router whose other matrices have other shapes (Zaya's router MLP)."""
    if known is not None:
        w = get_path(module, known)
        return known if isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] >= n else None
    matrices = [(path, p) for path, p in module.named_parameters() if p.dim() == 2 and tuple(p.shape) != (1, n)]
    if not matrices or any(p.shape[0] != n for _, p in matrices):
        return None
    return next((path for path, _ in matrices if path.endswith("weight")), None)


def _first_key(config: Any, keys: tuple[str, ...], value: int) -> str | None:
    """The first of ``keys`` holding ``value`` in the config, else in a sub-config (as a dotted key: DBRX's
    ``ffn_config.moe_num_experts``)."""
    subs = [(f"{name}.", sub) for name in getattr(config, "sub_configs", {}) if (sub := getattr(config, name, None))]
    for prefix, cfg in [("", config), *subs]:
        for key in keys:
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) == value:
                return prefix + key
    return None


def _neurons(experts: nn.Module) -> tuple[tuple[str, NeuronAxis], ...]:
    """Neuron axes of fused experts from the flags ``@use_experts_implementation`` sets."""
    t = bool(getattr(experts, "is_transposed", False))
    packing = ("halves" if getattr(experts, "is_concatenated", True) else "pairs") if getattr(experts, "has_gate", True) else ""
    names = dict(experts.named_parameters(recurse=False))
    up = "gate_up_proj" if "gate_up_proj" in names else "up_proj"
    out = [(up, NeuronAxis(1 if t else 0, packing if up == "gate_up_proj" else ""))]
    if f"{up}_bias" in names:
        out.append((f"{up}_bias", NeuronAxis(0, packing if up == "gate_up_proj" else "")))
    out.append(("down_proj", NeuronAxis(0 if t else 1)))
    return tuple(out)


def _expert_children(block: nn.Module, flat: bool = False, fixed: int = 0) -> list[tuple[str, int, str]]:
    found = []
    for name, child in block.named_children():
        n = _flat_count(child, block) if flat else _fused_count(child, fixed)
        if n is not None:
            found.append((name, n, "fused"))
        elif (n := _module_count(child)) is not None:
            found.append((name, n, "modules"))
    return found


def _stack_of(model: nn.Module, name: str) -> str | None:
    """The outermost list of layers above a block (Switch: ``encoder.block``, not ``encoder.block.1.layer``)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if isinstance(model.get_submodule(prefix), nn.ModuleList) and parts[i].isdigit():
            return prefix
    return None


def find_blocks(model: nn.Module, known_router: str | None = None
                ) -> tuple[list[tuple[str, nn.Module, str, str, str]], list[str]]:
    """``[(name, block, experts_attr, router_attr, router_weight)]`` and why candidate blocks failed
    (``known_router``: the router weight's path the family table names, if any)."""
    blocks, problems = [], []
    flat = bool(QUIRKS.get(str(getattr(model.config, "model_type", None)), {}).get("flat_experts"))
    fixed = _fixed_count(model.config)
    for name, block in model.named_modules():
        experts = _expert_children(block, flat, fixed)
        if not experts:
            continue
        if len(experts) > 1:
            problems.append(f"{name or 'model'} splits its experts over {', '.join(e[0] for e in experts)}")
            continue
        e_attr, n, _ = experts[0]
        routers = [(cname, w) for cname, child in block.named_children() if cname != e_attr
                   and (w := _router_weight(child, n + fixed, known_router)) is not None]
        if len(routers) != 1:
            problems.append(f"{name}.{e_attr} holds {n} experts but {'no' if not routers else 'more than one'} "
                            f"sibling module holds a router weight[{n}, H]")
            continue
        blocks.append((name, block, e_attr, routers[0][0], routers[0][1]))
    return blocks, problems


def _fixed_count(config: Any) -> int:
    """Router classes the family has beside the real experts and never removes (:attr:`Family.fixed_experts`,
    :attr:`Family.router_extra_rows`)."""
    quirks = QUIRKS.get(str(getattr(config, "model_type", None)), {})
    key = quirks.get("fixed_experts")
    return int(getattr(config, key, 0) or 0) if key else int(quirks.get("router_extra_rows", 0))


def _call_problem(experts: nn.Module, layout: str, mt: str) -> str | None:
    if layout != "fused" or QUIRKS.get(mt, {}).get("routing") is not None:  # routing read at the router
        return None
    params = [p for p in inspect.signature(experts.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    if len(params) < 3:
        return (f"{type(experts).__name__}.forward takes ({', '.join(p.name for p in params)}), not "
                "(hidden, top_k_index, top_k_weights)")
    return None


def discover(model: nn.Module) -> tuple[Family, list[tuple[str, nn.Module]]]:
    """The model's :class:`Family` and its MoE blocks ``[(name, block)]``, or a one-line refusal."""
    mt = str(getattr(model.config, "model_type", None))
    config = text_config(model.config)  # an image-text model's language model keys sit in its text_config
    if mt in REFUSED:
        raise MoeSlimError(f"model type '{mt}' is not supported: {REFUSED[mt]}")
    blocks, problems = find_blocks(model, QUIRKS.get(mt, {}).get("router_weight"))
    if not blocks:
        from .catalog import moe_model_types

        if mt in moe_model_types():
            raise MoeSlimError(f"model of type '{mt}' has no MoE layer (its config may turn every MoE block off; "
                               "for dense models use `moe-slim probe`)")
        if problems:
            raise MoeSlimError(f"model type '{mt}' is not a supported MoE family: {problems[0]}")
        raise MoeSlimError(f"model type '{mt}' is not a supported MoE family: no module holds experts (3-D "
                           "parameters with a leading expert dimension E) beside a router weight[E, H] "
                           "(for dense models use `moe-slim probe`)")
    name, block, e_attr, r_attr, r_weight = blocks[0]
    if len({(b[2], b[3], b[4]) for b in blocks}) != 1:
        raise MoeSlimError(f"model type '{mt}': MoE blocks name their parts differently ({blocks[0][0]} vs others)")
    experts, router = getattr(block, e_attr), getattr(block, r_attr)
    fixed = _fixed_count(config)
    n = int(get_path(router, r_weight).shape[0]) - fixed
    flat = bool(QUIRKS.get(mt, {}).get("flat_experts"))
    layout = "fused" if flat or _fused_count(experts, fixed) is not None else "modules"
    why = _call_problem(experts, layout, mt)
    if why:
        raise MoeSlimError(f"model type '{mt}' is not supported: {why}")
    bias_path = r_weight[: -len("weight")] + "bias"
    bias = get_path(router, bias_path)
    router_bias = bias_path if bias is not None and tuple(bias.shape) == (n + fixed,) else None
    shared = tuple(c for c, child in block.named_children() if c not in (e_attr, r_attr)
                   and any(True for _ in child.parameters()))
    own = {f"{r_attr}.{r_weight}"} | ({f"{r_attr}.{router_bias}"} if router_bias else set())
    # over every block: DeepSeek-V4's hash layers have no correction bias, its learned ones do
    selection = tuple(dict.fromkeys(path for b in blocks for path, t in [*b[1].named_parameters(), *b[1].named_buffers()]
                                    if not path.startswith((f"{e_attr}.", *(f"{s}." for s in shared)))
                                    and path not in own and expert_axis(tuple(t.shape), n + fixed) is not None))
    scoring = str(getattr(config, "scoring_func", "") or "")
    scoring = scoring if scoring in ("softmax", *POSITIVE_SCORES) else ("sigmoid" if selection else "softmax")
    top_k_key = _first_key(config, TOP_K_KEYS, int(getattr(router, "top_k", getattr(block, "top_k", -1))))
    top_k_key = top_k_key or next((k for k in TOP_K_KEYS if isinstance(getattr(config, k, None), int)), None)
    fixed = None if top_k_key else getattr(router, "top_k", getattr(block, "top_k", None))
    grouped = all(isinstance(getattr(config, k, None), int) for k in ("n_group", "topk_group"))
    stacks = tuple(dict.fromkeys(s for b in blocks if (s := _stack_of(model, b[0]))))
    family = Family(
        name=mt, model_types=(mt,), block_classes=tuple(dict.fromkeys(type(b[1]).__name__ for b in blocks)),
        router_attr=r_attr, n_experts_key=_first_key(config, EXPERT_COUNT_KEYS, n), top_k_key=top_k_key,
        fixed_top_k=fixed, experts_attr=e_attr, layout=layout, shared_attrs=shared, router_weight=r_weight,
        router_bias=router_bias, selection_biases=selection, scoring=scoring,
        group_keys=("n_group", "topk_group") if grouped else None, group_min_experts=2 if selection else 1,
        expert_neurons=_neurons(experts) if layout == "fused" and not flat else (),
        layer_stacks=stacks or ("model.layers",),
    )
    family = dataclasses.replace(family, **QUIRKS.get(mt, QUIRKS.get(str(getattr(config, "model_type", None)), {})))
    return family, [(b[0], b[1]) for b in blocks]


_CACHE: dict[str, Family] = {}


def family_of(model_or_config: Any) -> Family:
    """The family of a model (from its modules) or of a config (from a weightless skeleton)."""
    if isinstance(model_or_config, nn.Module):
        return discover(model_or_config)[0]
    config = model_or_config
    mt = str(getattr(config, "model_type", None))
    if mt in REFUSED:
        raise MoeSlimError(f"model type '{mt}' is not supported: {REFUSED[mt]}")
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        from .skeleton import skeleton

        _CACHE.clear()  # one config at a time is what commands use
        _CACHE[key] = discover(skeleton(config))[0]
    return _CACHE[key]


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE block of ``model``, in module order; one-line errors for unsupported models."""
    family, blocks = discover(model)
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    return [MoeLayer(i, name, "encoder" if encdec and ".encoder." in f".{name}." else "decoder", block, family)
            for i, (name, block) in enumerate(blocks)]
