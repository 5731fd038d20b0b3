"""What a MoE family is to moe_slim: :class:`Family` (one per model, found from its structure) and
:class:`MoeLayer` (one MoE block of a model).

Two expert layouts exist in transformers 5:

* ``fused``: one module holds every expert as 3-D parameters (``gate_up_proj[E, ...]``,
  ``down_proj[E, ...]``, optional biases) and is called as ``experts(hidden, top_k_index,
  top_k_weights)``. Slicing dim 0 of those parameters removes experts.
  With :attr:`Family.flat_experts` (DBRX), the experts' parameters are 2-D ``[E*I, H]`` matrices,
  expert ``e`` in rows ``e*I .. (e+1)*I - 1``: moe_slim views them as ``[E, I, H]``
  (:meth:`MoeLayer.expert_params`) and slices them in blocks of rows (:func:`take_experts`).
* ``modules``: a ``ModuleDict`` of ``expert_{i}`` sub-modules (Switch Transformers, NLLB-MoE),
  called with a dense dispatch; :attr:`Family.combine` turns that call's arguments into a dense
  ``[tokens, experts]`` matrix of combine weights.

Every parameter or buffer of a block with a leading dimension of E (or a ``[1, E]`` row) belongs to
the experts, wherever it sits (router rows, router bias, DeepSeek's correction bias on the router,
MiniMax-M2's on the block, ERNIE-4.5's in ``moe_statics``): :meth:`MoeLayer.per_expert` finds them
all, and pruning slices them all.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MoeSlimError
from .config_keys import config_value, set_config_value, text_config

CombineFn = Callable[[nn.Module, tuple, dict], tuple[torch.Tensor, torch.Tensor]]
RoutingFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


#: Routers that score each expert on its own (a positive function of its logit), normalised over the
#: chosen ones: DeepSeek-V3's sigmoid, DeepSeek-V4's ``sqrt(softplus)``.
POSITIVE_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt()}


@dataclass(frozen=True)
class NeuronAxis:
    """Where an expert parameter keeps its intermediate neurons (for merging and alignment).

    ``axis`` indexes the parameter of ONE expert (fused layouts: without the leading expert
    dimension). ``packing`` says how neuron ``n`` maps to positions on that axis when the axis is
    longer than the neuron count: ``""`` -> ``n``; ``"halves"`` -> ``n`` and ``n + I`` (gate and up
    concatenated, ``chunk(2)``); ``"pairs"`` -> ``2n`` and ``2n + 1`` (gate/up interleaved, GPT-OSS).
    """

    axis: int
    packing: str = ""  # "" | "halves" | "pairs"


#: Fused SwiGLU experts: ``gate_up_proj[E, 2I, H]`` (gate rows then up rows), ``down_proj[E, H, I]``.
SWIGLU_NEURONS: tuple[tuple[str, NeuronAxis], ...] = (
    ("gate_up_proj", NeuronAxis(0, "halves")),
    ("down_proj", NeuronAxis(1)),
)


@dataclass(frozen=True)
class Family:
    """One model's MoE shape: found from its module tree, with the family table's quirks applied."""

    name: str
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]
    router_attr: str
    n_experts_key: str | None
    top_k_key: str | None = "num_experts_per_tok"
    fixed_top_k: int | None = None
    experts_attr: str = "experts"
    layout: str = "fused"  # "fused" | "modules"
    shared_attrs: tuple[str, ...] = ()
    router_weight: str = "weight"  # path inside the router module
    router_bias: str | None = None  # a bias added to the logits before selection (inside the router)
    # per-expert biases added for selection only, as paths inside the BLOCK (DeepSeek-V3
    # ``gate.e_score_correction_bias``, MiniMax-M2 ``e_score_correction_bias``, ERNIE
    # ``gate.moe_statics.e_score_correction_bias``)
    selection_biases: tuple[str, ...] = ()
    logits_output: int = 0  # which router output holds the logits
    scoring: str = "softmax"  # "softmax" or a key of POSITIVE_SCORES: the router's normalised score
    exact_scores: bool = True  # whether routing weights are ``scoring`` scores of the chosen experts (up to a factor)
    group_keys: tuple[str, str] | None = None  # (n_group key, topk_group key) for group-limited top-k
    group_min_experts: int = 1  # experts a group must keep for the router to stay valid
    group_applies: Callable[[Any], bool] | None = None  # whether the config uses group-limited top-k
    combine: CombineFn | None = None  # "modules" layout: call args -> (hidden, combine[T, E])
    # Fused experts called with router-scaled inputs and no routing (Llama-4: ``experts(x * w)``, so a
    # token's output is ``sum_k f_k(w_k x)``): the router's (module, output) -> (top_k_index, top_k_weights).
    # moe_slim then records routing at the router and runs the experts' own code on the unscaled token.
    routing: RoutingFn | None = None
    # The router's output at ``logits_output`` holds softmax probabilities, not logits (Gemma-4): their log is
    # taken as the logits (softmax gives the probabilities back exactly; each token's row shifts by a constant).
    router_probabilities: bool = False
    # Path inside the block of a ``[E]`` tensor that multiplies each expert's combine weight after the router
    # normalised it (Gemma-4 ``router.per_expert_scale``): part of every gate statistic, sliced with the experts.
    expert_scale: str | None = None
    # Router classes after the E experts that no expert holds (Zaya's skip expert: selecting it computes
    # nothing). Router rows and biases of length E + extra keep those last entries when experts are sliced.
    router_extra_rows: int = 0
    # Per-expert parameter name -> where its intermediate neurons lie. Parameters not listed have no
    # neuron axis (output-side biases) and are averaged as they are when experts merge.
    expert_neurons: tuple[tuple[str, NeuronAxis], ...] = SWIGLU_NEURONS
    expert_down: str = "down_proj"  # the parameter that reads the neurons (its input is the activation)
    # Where an expert's number sits in an ON-DISK tensor name (per-expert layouts: Qwen3-MoE
    # ``mlp.experts.7.gate_proj.weight``, Switch/NLLB ``experts.expert_7.wi.weight``). On-disk names
    # map to modules through transformers' conversion tables (moe_slim.modeling.ondisk); a tensor under
    # the experts module without such a number is fused, with the experts along its first dimension.
    disk_expert_index: str = r"\.experts\.(?:expert_)?(\d+)\."
    # The ModuleLists of transformer layers, in the order a forward runs them (encoder first): what
    # layer-wise observation walks, one layer's weights in memory at a time.
    layer_stacks: tuple[str, ...] = ("model.layers",)
    # The experts' parameters (anywhere under the experts module) are flat 2-D [E*I, ...] matrices, expert e
    # in rows e*I .. (e+1)*I - 1 (DBRX ``experts.mlp.w1``): viewed as [E, I, ...], sliced in blocks of rows.
    flat_experts: bool = False
    # Path inside the block of a token id -> experts table ``[vocab, top_k]`` that replaces learned selection
    # in the layers that have it (DeepSeek-V4's hash layers: ``gate.tid2eid``); pruning remaps its entries.
    token_table: str | None = None
    # Experts routed beside the real ones but never removed, after them in the router's rows (LongCat-Flash's
    # zero-computation experts): the name of their count, both a config key and an attribute of the experts
    # module. Tensors with E + that many rows keep their last rows; the family's ``set_count`` renames the count.
    fixed_experts: str | None = None
    set_count: Callable[[nn.Module, int], None] | None = None  # (block, n) when the attributes need more than n
    notes: str = ""

    def neuron_axes(self) -> dict[str, NeuronAxis]:
        return dict(self.expert_neurons)

    def top_k(self, config: Any) -> int:
        if self.fixed_top_k is not None:
            return self.fixed_top_k
        return int(config_value(text_config(config), self.top_k_key))

    def num_experts(self, config: Any) -> int:
        return int(config_value(text_config(config), self._count_key()))

    def expert_rows(self, rows: int, n: int, keep: list[int], fixed: int = 0) -> list[int] | None:
        """The first-dimension rows of a tensor with ``rows`` rows that hold experts ``keep`` of ``n``: ``keep``
        itself for ``[E, ...]``, blocks of ``rows // n`` rows for flat experts, and ``keep`` then the ``fixed``
        experts' rows for a tensor that has them too (LongCat's zero-computation experts, kept last); None when
        it runs over no experts."""
        if rows == n:
            return list(keep)
        if fixed and rows == n + fixed:
            return kept_rows(keep, rows, n)
        if self.flat_experts and rows > n and rows % n == 0:
            size = rows // n
            return [e * size + j for e in keep for j in range(size)]
        return None

    def _count_key(self) -> str:
        if self.n_experts_key is None:
            raise MoeSlimError(f"no config key of this {self.name} model holds its expert count, so a pruned config "
                               "cannot state the new count")
        return self.n_experts_key

    def groups(self, config: Any) -> tuple[int, int] | None:
        """``(n_group, topk_group)`` when the router limits top-k to groups, else None."""
        config = text_config(config)
        if self.group_keys is None or (self.group_applies and not self.group_applies(config)):
            return None
        n_group = int(getattr(config, self.group_keys[0], 1) or 1)
        topk_group = int(getattr(config, self.group_keys[1], 1) or 1)
        return (n_group, topk_group) if n_group > 1 else None


def get_path(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for path ``a.b``, or None when any part is missing."""
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def take_experts(t: torch.Tensor, axis: int, keep: torch.Tensor, n: int, fixed: int = 0) -> torch.Tensor:
    """``t`` with only experts ``keep`` (in that order) along ``axis``, which holds ``n`` experts: one
    position each, or (flat experts) ``axis`` length // n consecutive positions each. An axis of ``n + fixed``
    positions (LongCat's zero-computation experts after the real ones) keeps the fixed ones last."""
    if fixed and t.shape[axis] == n + fixed:
        rows = torch.tensor(kept_rows(keep.tolist(), n + fixed, n), dtype=torch.long, device=t.device)
        return t.index_select(axis, rows)
    return t.unflatten(axis, (n, -1)).index_select(axis, keep.to(t.device)).flatten(axis, axis + 1)


def expert_axis(shape: tuple[int, ...], n: int) -> int | None:
    """The axis of a tensor that runs over ``n`` experts: 0 for ``[E, ...]``, 1 for a ``[1, E]`` row."""
    if len(shape) >= 1 and shape[0] == n:
        return 0
    if len(shape) == 2 and shape[0] == 1 and shape[1] == n:
        return 1
    return None


def _probe_owner(owners: dict[str, nn.Module], path: str) -> nn.Module:
    """The copy of the sub-module at ``path`` inside a probe (``owners[""]``), with its own parameter dict."""
    if path not in owners:
        parent_path, _, attr = path.rpartition(".")
        parent = _probe_owner(owners, parent_path)
        parent._modules = dict(parent._modules)
        child = copy.copy(parent._modules[attr])
        child._parameters = dict(child._parameters)
        parent._modules[attr] = owners[path] = child
    return owners[path]


@dataclass
class MoeLayer:
    """One MoE block of a model."""

    index: int  # position among the model's MoE layers
    name: str  # module path, e.g. "model.layers.3.mlp"
    stack: str  # "decoder" or "encoder" (which attention mask applies)
    block: nn.Module
    family: Family = field(repr=False)

    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.family.router_attr)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.family.experts_attr)

    @property
    def router_weight(self) -> torch.Tensor:
        return get_path(self.router, self.family.router_weight)

    @property
    def router_bias(self) -> torch.Tensor | None:
        return get_path(self.router, self.family.router_bias) if self.family.router_bias else None

    @property
    def correction_bias(self) -> torch.Tensor | None:
        """The first selection-only bias (None when the router has none)."""
        for path in self.family.selection_biases:
            t = get_path(self.block, path)
            if t is not None:
                return t
        return None

    @property
    def token_table(self) -> torch.Tensor | None:
        """The layer's token id -> experts table (None where selection is learned)."""
        return get_path(self.block, self.family.token_table) if self.family.token_table else None

    @property
    def expert_scale(self) -> torch.Tensor | None:
        return get_path(self.block, self.family.expert_scale) if self.family.expert_scale else None

    @property
    def num_fixed(self) -> int:
        """Router classes after the real experts that every plan keeps: LongCat's zero-computation experts
        (their count an attribute of the experts), Zaya's skip expert (:attr:`Family.router_extra_rows`)."""
        if self.family.fixed_experts:
            return int(getattr(self.experts, self.family.fixed_experts, 0) or 0)
        return self.family.router_extra_rows

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0]) - self.num_fixed

    def router_logits(self, output: Any) -> torch.Tensor:
        """The logits in a router's forward output (log-probabilities where it returns probabilities)."""
        logits = output[self.family.logits_output] if isinstance(output, (tuple, list)) else output
        if self.family.router_probabilities:
            return logits.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        return logits

    def per_expert(self) -> dict[str, int]:
        """Every tensor of the block that runs over the experts: block-relative path -> expert axis.

        Fused expert parameters, router rows and bias, and selection biases, in the router, the experts
        or elsewhere on the block; children with parameters of their own (shared experts, and attention
        where the block is the decoder layer) are not the routed experts, and a modules-layout block's
        experts are whole modules. Rows of length E + :attr:`num_fixed` count too (see :func:`kept_rows`)."""
        n = self.num_experts
        skip = tuple(f"{c}." for c, child in self.block.named_children()
                     if c not in (self.family.router_attr, self.family.experts_attr)
                     and (c in self.family.shared_attrs or any(True for _ in child.parameters())))
        if self.family.layout == "modules":
            skip += (f"{self.family.experts_attr}.",)
        flat = f"{self.family.experts_attr}." if self.family.flat_experts else None
        out: dict[str, int] = {}
        for path, t in [*self.block.named_parameters(), *self.block.named_buffers()]:
            if path.startswith(skip) or path == self.family.token_table:  # a table holds expert ids, not rows
                continue
            if flat and path.startswith(flat) and t.dim() == 2 and t.shape[0] % n == 0:
                axis = 0  # flat experts [E*I, ...]
            elif self.num_fixed and t.shape[0] == n + self.num_fixed:
                axis = 0  # real experts, then the fixed ones
            else:
                axis = expert_axis(tuple(t.shape), n)
            if axis is not None:
                out[path] = axis
        return out

    def expert_params(self) -> dict[str, torch.Tensor]:
        """Fused layout: the experts module's parameters with a leading expert dimension ``[E, ...]``
        (flat experts: ``[E, I, ...]`` views of the ``[E*I, ...]`` parameters, named by their path under
        the experts module; writing into a view writes into the parameter)."""
        if self.family.layout != "fused":
            raise TypeError("expert_params() is for fused experts")
        n = self.num_experts
        if self.family.flat_experts:
            return {k: p.unflatten(0, (n, -1)) for k, p in self.experts.named_parameters()
                    if p.dim() == 2 and p.shape[0] % n == 0}
        return {k: p for k, p in self.experts.named_parameters(recurse=False)
                if p.dim() >= 1 and p.shape[0] in (n, n + self.num_fixed)}

    def one_expert(self, e: int, replace: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Fused experts as a view holding expert ``e`` alone (parameters in ``replace`` swapped in, shaped
        ``[1, ...]`` as :meth:`expert_params` slices are), to run through the experts' own forward code
        (:meth:`expert_output`). Sub-modules holding parameters are copied too: the original is never touched."""
        probe = copy.copy(self.experts)
        probe._parameters = dict(self.experts._parameters)
        owners: dict[str, nn.Module] = {"": probe}
        for name, p in self.expert_params().items():
            path, _, leaf = name.rpartition(".")
            owner = _probe_owner(owners, path)
            one = (replace or {}).get(name, p.detach()[e : e + 1])
            owner._parameters[leaf] = one.flatten(0, 1) if self.family.flat_experts else one
        for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
            if isinstance(getattr(probe, attr, None), int):
                setattr(probe, attr, 1)
        if self.family.set_count is not None:
            self.family.set_count(probe, 1)
        return probe

    def expert_output(self, probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The unweighted output ``f(x)`` of a :meth:`one_expert` view on rows ``x`` ``[n, H]``, through the
        class's own forward in the family's call convention."""
        forward = type(self.experts).forward
        if self.family.routing is not None:  # router-scaled inputs: an unscaled row is weight 1
            return forward(probe, x)
        idx = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        out = forward(probe, x, *self.one_per_row(idx, ones, 1))
        return out.reshape(x.shape[0], out.shape[-1])  # DBRX answers [n, 1, H]

    def one_per_row(self, index: torch.Tensor, weights: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An experts call with one expert per row (``index`` ``[T, 1]`` of ``n`` real experts). LongCat's experts
        cannot take top-1 calls (their forward squeezes the top-k axis away), so with fixed experts each row also
        names the first of them at weight 0: an identity expert that adds nothing. (Zaya's skip expert is a
        router class only: its experts module has no row for it.)"""
        if not self.family.fixed_experts or not self.num_fixed:
            return index, weights
        return (torch.cat([index, torch.full_like(index, n)], 1), torch.cat([weights, torch.zeros_like(weights)], 1))

    def expert_module(self, e: int) -> nn.Module:
        """Modules layout: expert ``e`` as a module."""
        return self.experts[f"expert_{e}"]

    def router_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The router's normalised score of every class for every token (rows sum to 1; LongCat's zero-computation
        experts and Zaya's skip expert are the columns after the :attr:`num_experts` real ones), each real expert's
        times its scale where the router applies one (Gemma-4's per_expert_scale)."""
        logits = logits.float().reshape(-1, logits.shape[-1])
        if self.family.scoring in POSITIVE_SCORES:
            s = POSITIVE_SCORES[self.family.scoring](logits)
            s = s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        else:
            s = logits.softmax(-1)
        scale = self.expert_scale
        if scale is None:
            return s
        n = self.num_experts
        return torch.cat([s[:, :n] * scale.detach().float().to(s.device), s[:, n:]], 1)


def kept_rows(keep: list[int], length: int, n: int) -> list[int]:
    """Indices that keep experts ``keep`` along an axis of ``length`` entries over ``n`` experts: classes after
    the experts (LongCat's zero experts, Zaya's skip expert) stay, in their order, after the kept ones."""
    return list(keep) + list(range(n, length))


def check_uniform(layers: list[MoeLayer]) -> int:
    """The common expert count of all layers (moe_slim statistics assume one)."""
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise MoeSlimError(f"layers have different expert counts {sorted(counts)}; expected one count")
    return counts.pop()


def set_expert_count(layer: MoeLayer, n: int) -> None:
    """Tell every module of a block (router, experts, block) that it now has ``n`` experts."""
    if layer.family.set_count is not None:
        layer.family.set_count(layer.block, n)
        return
    for module in layer.block.modules():
        for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, n)
        if isinstance(getattr(module, "num_router_classes", None), int):  # Zaya: experts + skip expert
            module.num_router_classes = n + layer.family.router_extra_rows
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(module, attr, None), int) and getattr(module, attr) > n:
                setattr(module, attr, n)


def set_config_counts(config: Any, family: Family, n: int) -> None:
    """Write the new expert count (and a top-k that fits) into the config (an image-text model's text config;
    dotted keys: into a sub-config)."""
    config = text_config(config)
    set_config_value(config, family._count_key(), n)
    if family.top_k_key is not None and int(config_value(config, family.top_k_key)) > n:
        set_config_value(config, family.top_k_key, n)


def group_size_ok(family: Family, config: Any, n_keep: int) -> str | None:
    """Why keeping ``n_keep`` experts per layer breaks the group-limited router, or None."""
    groups = family.groups(config)
    if groups is None:
        return None
    n_group, topk_group = groups
    if n_keep % n_group:
        return (f"the router picks experts within {n_group} groups, so each layer must keep a multiple of "
                f"{n_group} experts (got {n_keep})")
    per_group = n_keep // n_group
    if per_group < family.group_min_experts:
        return (f"each of the {n_group} router groups must keep at least {family.group_min_experts} experts "
                f"(got {per_group})")
    if per_group * topk_group < family.top_k(config):
        return (f"top-{family.top_k(config)} routing over {topk_group} groups of {per_group} experts is "
                f"impossible; keep at least {math.ceil(family.top_k(config) / topk_group) * n_group} experts")
    return None
