"""A weightless skeleton of a model (every parameter on the meta device): its structure for free."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def skeleton(config: Any) -> nn.Module:
    """The model of ``config`` with names and shapes but no memory.

    A quantization block in the config is ignored: the skeleton has the model's logical parameters.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = copy.deepcopy(config)  # from_config(dtype=...) sets the config's dtype: never the caller's object
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with init_empty_weights():  # buffers computed at init (sinusoidal positions) in float32, as a float32 load has them
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval()
