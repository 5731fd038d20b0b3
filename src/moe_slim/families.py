"""The family table: where each MoE family keeps its blocks, routers and experts.

This module is the ONLY place that knows model classes. Adding a family is adding one
:class:`Family` entry (plus a tiny-model test). Everything else in moe_slim works on
:class:`MoeLayer` handles found through this table.

Two expert layouts exist in transformers 5:

* ``fused``: one module holds every expert as 3-D parameters (``gate_up_proj[E, ...]``,
  ``down_proj[E, ...]``, optional biases) and is called as ``experts(hidden, top_k_index,
  top_k_weights)``. Slicing dim 0 of those parameters removes experts.
* ``modules``: a ``ModuleDict`` of ``expert_{i}`` sub-modules (Switch Transformers, NLLB-MoE),
  called with a dense dispatch; :attr:`Family.combine` turns that call's arguments into a dense
  ``[tokens, experts]`` matrix of combine weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import MoeSlimError

CombineFn = Callable[[nn.Module, tuple, dict], tuple[torch.Tensor, torch.Tensor]]


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


def _combine_switch(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch: ``experts(hidden, one_hot_dispatch[T,1,E], weights[T,1])`` (capacity already applied)."""
    hidden, dispatch, weights = args[:3]
    return hidden, dispatch[:, 0, :].to(weights.dtype) * weights


def _combine_nllb(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """NLLB-MoE: ``experts(hidden, top1_mask[T,E], combine_weights[T,E])``.

    The router's combine weights already hold both the top-1 and top-2 gates (zero where capacity
    dropped a token). Fairseq scales expert outputs by ``1 - moe_token_dropout`` at inference.
    """
    hidden, _top1, combine = args[:3]
    if not experts.training and getattr(experts, "moe_token_dropout", 0.0) > 0:
        combine = combine * (1.0 - experts.moe_token_dropout)
    return hidden, combine


@dataclass(frozen=True)
class Family:
    """Declarative description of one MoE family."""

    name: str
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]
    router_attr: str
    n_experts_key: str
    top_k_key: str | None = "num_experts_per_tok"
    fixed_top_k: int | None = None
    experts_attr: str = "experts"
    layout: str = "fused"  # "fused" | "modules"
    shared_attrs: tuple[str, ...] = ()
    router_weight: str = "weight"  # path inside the router module
    router_bias: str | None = None  # a bias added to the logits before selection
    correction_bias: str | None = None  # added to scores for selection only (DeepSeek-V3)
    logits_output: int = 0  # which router output holds the logits
    scoring: str = "softmax"  # "softmax" | "sigmoid": the router's normalised score
    group_keys: tuple[str, str] | None = None  # (n_group key, topk_group key) for group-limited top-k
    group_min_experts: int = 1  # experts a group must keep for the router to stay valid
    group_applies: Callable[[Any], bool] | None = None  # whether the config uses group-limited top-k
    combine: CombineFn | None = None  # "modules" layout: call args -> (hidden, combine[T, E])
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
    notes: str = ""

    def neuron_axes(self) -> dict[str, NeuronAxis]:
        return dict(self.expert_neurons)

    def top_k(self, config: Any) -> int:
        if self.fixed_top_k is not None:
            return self.fixed_top_k
        return int(getattr(config, self.top_k_key))

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.n_experts_key))

    def groups(self, config: Any) -> tuple[int, int] | None:
        """``(n_group, topk_group)`` when the router limits top-k to groups, else None."""
        if self.group_keys is None or (self.group_applies and not self.group_applies(config)):
            return None
        n_group = int(getattr(config, self.group_keys[0]) or 1)
        topk_group = int(getattr(config, self.group_keys[1]) or 1)
        return (n_group, topk_group) if n_group > 1 else None


FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen3_moe", model_types=("qwen3_moe",), block_classes=("Qwen3MoeSparseMoeBlock",),
        router_attr="gate", n_experts_key="num_experts",
    ),
    Family(
        name="qwen2_moe", model_types=("qwen2_moe",), block_classes=("Qwen2MoeSparseMoeBlock",),
        router_attr="gate", n_experts_key="num_experts",
        shared_attrs=("shared_expert", "shared_expert_gate"),
    ),
    Family(
        name="olmoe", model_types=("olmoe",), block_classes=("OlmoeSparseMoeBlock",),
        router_attr="gate", n_experts_key="num_experts",
    ),
    Family(
        name="mixtral", model_types=("mixtral",), block_classes=("MixtralSparseMoeBlock",),
        router_attr="gate", n_experts_key="num_local_experts",
    ),
    Family(
        name="deepseek_v2", model_types=("deepseek_v2",), block_classes=("DeepseekV2Moe",),
        router_attr="gate", n_experts_key="n_routed_experts", shared_attrs=("shared_experts",),
        group_keys=("n_group", "topk_group"),
        group_applies=lambda c: getattr(c, "topk_method", "greedy") == "group_limited_greedy",
        notes="softmax router; group-limited greedy top-k when topk_method='group_limited_greedy'",
    ),
    Family(
        name="deepseek_v3", model_types=("deepseek_v3",), block_classes=("DeepseekV3MoE",),
        router_attr="gate", n_experts_key="n_routed_experts", shared_attrs=("shared_experts",),
        scoring="sigmoid", correction_bias="e_score_correction_bias",
        group_keys=("n_group", "topk_group"), group_min_experts=2,
        notes="sigmoid router with e_score_correction_bias; groups score by their top-2 experts",
    ),
    Family(
        name="gpt_oss", model_types=("gpt_oss",), block_classes=("GptOssMLP",),
        router_attr="router", n_experts_key="num_local_experts", router_bias="bias",
        expert_neurons=(("gate_up_proj", NeuronAxis(1, "pairs")), ("gate_up_proj_bias", NeuronAxis(0, "pairs")),
                        ("down_proj", NeuronAxis(0))),
        notes="router bias; expert biases; interleaved gate_up layout [E, H, 2I]",
    ),
    Family(
        name="granitemoe", model_types=("granitemoe",), block_classes=("GraniteMoeMoE",),
        router_attr="router", n_experts_key="num_local_experts",
    ),
    Family(
        name="phimoe", model_types=("phimoe",), block_classes=("PhimoeSparseMoeBlock",),
        router_attr="router", n_experts_key="num_local_experts",
        notes="sparsemixer routing: weights come from masked softmaxes over the logits",
    ),
    Family(
        name="switch_transformers", model_types=("switch_transformers",),
        block_classes=("SwitchTransformersSparseMLP",), router_attr="router", n_experts_key="num_experts",
        top_k_key=None, fixed_top_k=1, layout="modules", router_weight="classifier.weight",
        router_bias="classifier.bias", logits_output=2, combine=_combine_switch,
        expert_neurons=(("wi.weight", NeuronAxis(0)), ("wo.weight", NeuronAxis(1))), expert_down="wo.weight",
        layer_stacks=("encoder.block", "decoder.block"),
        notes="top-1 with expert capacity; experts are modules expert_{i}",
    ),
    Family(
        name="nllb_moe", model_types=("nllb-moe", "nllb_moe"), block_classes=("NllbMoeSparseMLP",),
        router_attr="router", n_experts_key="num_experts", top_k_key=None, fixed_top_k=2,
        layout="modules", router_weight="classifier.weight", router_bias="classifier.bias",
        logits_output=2, combine=_combine_nllb,
        expert_neurons=(("fc1.weight", NeuronAxis(0)), ("fc1.bias", NeuronAxis(0)), ("fc2.weight", NeuronAxis(1))),
        expert_down="fc2.weight", layer_stacks=("model.encoder.layers", "model.decoder.layers"),
        notes="top-2 with capacity; experts are modules expert_{i}; moe_slim runs the experts with "
        "fairseq's dispatch (transformers 5.x's NllbMoeExperts.forward only ever runs experts 0 and 1)",
    ),
)


#: Quantization formats (``config.quantization_config.quant_method``) whose expert tensors a rewrite
#: slices without dequantizing, and the on-disk tensors each adds beside the weights. Both keep the
#: experts along the first dimension of every tensor (or one tensor per expert), so pruning copies
#: byte ranges; the quantization block of the config stays valid as it is.
SLICEABLE_QUANTIZATION: dict[str, str] = {
    "mxfp4": "GPT-OSS MXFP4: fused *_blocks [E, rows, groups, 16] and *_scales [E, rows, groups], uint8",
    "fp8": "FP8 with block scales (DeepSeek-V3): weight float8_e4m3fn + weight_scale_inv per expert",
}


def supported_families() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_of(model_or_config: Any) -> Family:
    """The family entry for a model or config, or a one-line error listing the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise MoeSlimError(
        f"model type '{model_type}' is not a supported MoE family (supported: {supported_families()})"
    )


def get_path(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for path ``a.b``, or None when any part is missing."""
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class MoeLayer:
    """One MoE block of a model, found through the family table."""

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
        return get_path(self.router, self.family.correction_bias) if self.family.correction_bias else None

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

    def expert_params(self) -> dict[str, torch.Tensor]:
        """Fused layout: the experts module's parameters with a leading expert dimension."""
        if self.family.layout != "fused":
            raise TypeError("expert_params() is for fused experts")
        n = self.num_experts
        return {k: p for k, p in self.experts.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == n}

    def expert_module(self, e: int) -> nn.Module:
        """Modules layout: expert ``e`` as a module."""
        return self.experts[f"expert_{e}"]

    def router_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The router's normalised score of every expert for every token (rows sum to 1)."""
        logits = logits.float().reshape(-1, logits.shape[-1])
        if self.family.scoring == "sigmoid":
            s = logits.sigmoid()
            return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        return logits.softmax(-1)


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE block of ``model``, in module order; one-line errors for unsupported models."""
    family = family_of(model)
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    layers: list[MoeLayer] = []
    for name, module in model.named_modules():
        if type(module).__name__ in family.block_classes:
            stack = "encoder" if encdec and ".encoder." in f".{name}." else "decoder"
            layers.append(MoeLayer(len(layers), name, stack, module, family))
    if not layers:
        raise MoeSlimError(
            f"model of type '{model.config.model_type}' has no MoE layer (moe_slim slims MoE models of: "
            f"{supported_families()}; for dense models use `moe-slim probe`)"
        )
    return layers


def check_uniform(layers: list[MoeLayer]) -> int:
    """The common expert count of all layers (moe_slim statistics assume one)."""
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise MoeSlimError(f"layers have different expert counts {sorted(counts)}; expected one count")
    return counts.pop()


def set_expert_count(layer: MoeLayer, n: int) -> None:
    """Tell every module of a block (router, experts, block) that it now has ``n`` experts."""
    for module in layer.block.modules():
        for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, n)
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(module, attr, None), int) and getattr(module, attr) > n:
                setattr(module, attr, n)


def set_config_counts(config: Any, family: Family, n: int) -> None:
    """Write the new expert count (and a top-k that fits) into the config."""
    setattr(config, family.n_experts_key, n)
    if family.top_k_key is not None and int(getattr(config, family.top_k_key)) > n:
        setattr(config, family.top_k_key, n)


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
