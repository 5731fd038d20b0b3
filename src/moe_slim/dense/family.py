"""Where the layers of each supported model family live: a declarative table.

This is the only module of :mod:`moe_slim.dense` that knows model classes. A family entry says,
for each *stack* of layers (a decoder-only model has one, T5 has an encoder and a decoder stack):

* ``path``: the ``nn.ModuleList`` of layers, relative to ``model.base_model``;
* ``count_key``: the config key that holds the number of layers of that stack;
* ``final_norm``: the norm the stack applies after its last layer (applied to every layer's output
  before probing, so that probing layer ``l`` predicts what a model truncated after ``l`` shows);
* ``first_layer_owns``: parameters only the first layer of the stack has but the whole stack uses
  (T5's relative attention bias); they move to the new first layer when the old one is removed.

and, for the config of the (single-stack) decoder and encoder families, how per-layer information
is re-mapped when layers are removed:

* ``per_layer_lists``: lists with one entry per layer (``layer_types`` ...), subset in order;
* ``index_lists``: lists of layer indices (``mlp_only_layers``), re-indexed;
* ``prefix_counts``: integers meaning "the first k layers" (``first_k_dense_replace``), recounted;
* ``sparse_step``: Qwen-MoE's "every n-th layer is sparse" rule, rewritten as an explicit list.

Adding a family is adding one entry here plus a tiny-model test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MoeSlimError


@dataclass(frozen=True)
class Stack:
    """One stack of layers of a model."""

    name: str
    path: str
    count_key: str
    final_norm: str | None = None
    # (module path inside the layer, attribute, flag set True on that module) moved to the new first layer
    first_layer_owns: tuple[tuple[str, str, str], ...] = ()
    # the stack module's own config key for its layer count, when it keeps a private config copy (T5)
    module_count_key: str | None = None


@dataclass(frozen=True)
class SparseStep:
    """Qwen-MoE layout: layer i is sparse iff i not in ``indices_key`` and (i+1) % step == 0."""

    step_key: str = "decoder_sparse_step"
    indices_key: str = "mlp_only_layers"
    experts_key: str = "num_experts"


@dataclass(frozen=True)
class Family:
    """How to find and re-map the layers of one model family."""

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...]
    kind: str  # "decoder", "encoder" or "encoder-decoder"
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    index_lists: tuple[str, ...] = ()
    prefix_counts: tuple[str, ...] = ()
    sparse_step: SparseStep | None = None
    moe: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_T5_BIAS = (("layer.0.SelfAttention", "relative_attention_bias", "has_relative_attention_bias"),)
_DECODER = (Stack("decoder", "layers", "num_hidden_layers", final_norm="norm"),)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "granite", "olmo2", "phi3"), _DECODER, "decoder"),
    Family("qwen2", ("qwen2", "qwen3"), _DECODER, "decoder", prefix_counts=("max_window_layers",)),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), _DECODER, "decoder"),
    Family("smollm3", ("smollm3",), _DECODER, "decoder", per_layer_lists=("layer_types", "no_rope_layers")),
    Family("mixtral", ("mixtral", "olmoe"), _DECODER, "decoder", moe=True),
    Family(
        "qwen-moe", ("qwen2_moe", "qwen3_moe"), _DECODER, "decoder",
        index_lists=("mlp_only_layers",), prefix_counts=("max_window_layers",), sparse_step=SparseStep(), moe=True,
    ),
    Family("deepseek-moe", ("deepseek_v3",), _DECODER, "decoder", prefix_counts=("first_k_dense_replace",), moe=True),
    Family(
        "bert", ("bert", "roberta", "xlm-roberta"),
        (Stack("encoder", "encoder.layer", "num_hidden_layers"),), "encoder", per_layer_lists=(),
    ),
    Family(
        "t5", ("t5", "mt5", "umt5"),
        (
            Stack("encoder", "encoder.block", "num_layers", final_norm="encoder.final_layer_norm",
                  first_layer_owns=_T5_BIAS, module_count_key="num_layers"),
            Stack("decoder", "decoder.block", "num_decoder_layers", final_norm="decoder.final_layer_norm",
                  first_layer_owns=_T5_BIAS, module_count_key="num_layers"),
        ),
        "encoder-decoder", per_layer_lists=(),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for_config(config: Any) -> Family:
    """The family entry of a config, or a one-line error listing the supported model types."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise MoeSlimError(
        f"layer family of model type {model_type!r} is not supported by the dense tools; "
        f"supported: {', '.join(supported_model_types())} (add an entry to moe_slim/dense/family.py)"
    )


def family_for(model: torch.nn.Module) -> Family:
    return family_for_config(model.config)


def get_path(root: torch.nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def parent_and_name(root: torch.nn.Module, path: str) -> tuple[Any, str]:
    head, _, tail = path.rpartition(".")
    return (get_path(root, head) if head else root), tail


def layer_list(model: torch.nn.Module, stack: Stack) -> torch.nn.ModuleList:
    """The ``nn.ModuleList`` of a stack."""
    try:
        layers = get_path(model.base_model, stack.path)
    except (AttributeError, IndexError) as exc:
        raise MoeSlimError(
            f"model {type(model).__name__} has no layer stack at {stack.path!r} "
            f"(is it a {model.config.model_type} model with its usual layout?)"
        ) from exc
    if not isinstance(layers, torch.nn.ModuleList):
        raise MoeSlimError(f"{stack.path!r} of {type(model).__name__} is not a list of layers")
    return layers


def final_norm(model: torch.nn.Module, stack: Stack) -> torch.nn.Module | None:
    if stack.final_norm is None:
        return None
    try:
        return get_path(model.base_model, stack.final_norm)
    except AttributeError:
        return None


def stack_layers(model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """Every stack of the model by name (a T5 encoder-only model has just its encoder)."""
    fam = family_for(model)
    out: dict[str, torch.nn.ModuleList] = {}
    for stack in fam.stacks:
        try:
            get_path(model.base_model, stack.path.rpartition(".")[0] or stack.path)
        except AttributeError:
            if fam.kind == "encoder-decoder" and stack.name == "decoder":
                continue  # e.g. T5EncoderModel
            raise
        out[stack.name] = layer_list(model, stack)
    return out


def present_stacks(model: torch.nn.Module) -> list[Stack]:
    fam = family_for(model)
    names = stack_layers(model)
    return [s for s in fam.stacks if s.name in names]


def layer_param_counts(model: torch.nn.Module) -> dict[str, list[int]]:
    """Parameters of every layer, per stack (shared tensors counted once, in the first layer)."""
    seen: set[int] = set()
    out: dict[str, list[int]] = {}
    for name, layers in stack_layers(model).items():
        counts = []
        for layer in layers:
            n = 0
            for p in layer.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
            counts.append(n)
        out[name] = counts
    return out
