"""A weightless skeleton of a model (every parameter on the meta device): its structure for free."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def auto_class(config: Any) -> Any:
    """The transformers auto class that loads a whole checkpoint of ``config``, found from transformers'
    own mappings: encoder-decoders as seq2seq LMs, causal LMs as such, and image-text models (whose
    language model moe_slim slims) through ``AutoModelForImageTextToText``, vision tower included."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    return AutoModelForImageTextToText if image_text(getattr(config, "model_type", "")) else AutoModelForCausalLM


def image_text(model_type: str) -> bool:
    """Whether transformers loads ``model_type`` as an image-text model only (no causal-LM class of its own)."""
    from transformers.models.auto import modeling_auto as ma

    return (model_type not in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type in ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def skeleton(config: Any) -> nn.Module:
    """The model of ``config`` with names and shapes but no memory.

    A quantization block in the config is ignored: the skeleton has the model's logical parameters.
    """
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)  # from_config(dtype=...) sets the config's dtype: never the caller's object
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():  # buffers computed at init (sinusoidal positions) in float32, as a float32 load has them
        model = auto_class(config).from_config(config, dtype=torch.float32)
    model.tie_weights()  # as from_pretrained does: a tied lm_head is the embedding, counted and sized once
    return model.eval()


def non_text_parts(model: nn.Module) -> tuple[str, ...]:
    """An image-text model's parts that a text-only forward never runs (vision tower, projector, audio tower):
    the siblings of its language model that hold weights. () for a text model."""
    if getattr(model.config, "text_config", None) is None or not hasattr(model, "get_decoder"):
        return ()
    decoder = model.get_decoder()
    name = next((n for n, m in model.named_modules() if m is decoder and n), None)
    if name is None:
        return ()
    parent = name.rpartition(".")[0]
    return tuple(f"{parent}.{c}" if parent else c for c, m in model.get_submodule(parent).named_children()
                 if m is not decoder and any(True for _ in m.parameters()))
