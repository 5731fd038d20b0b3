"""The sweep stage ``recover: {sft: {...}}``: fine-tune a pruned or merged model in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import MoeSlimError
from .loop import sft

# --------------------------------------------------------------------------------------- sweeps


RECOVER_KEYS = {"steps", "data", "mode", "lr", "batch_size", "grad_accum", "seq_len", "warmup", "scheduler",
                "weight_decay", "eval_every", "val_examples", "patience", "seed", "lora_r", "lora_alpha",
                "lora_dropout", "lora_experts", "chrf_limit", "max_minutes"}
DEFAULT_RECOVER_DATA = "translation=0.8,general=0.2"


def recover(model: nn.Module, tok: Any, spec: Mapping[str, Any] | None, data_dir: str | os.PathLike | None = None
            ) -> dict[str, float]:
    """The sweep stage ``recover: {sft: {...}}``: fine-tune ``model`` in place, return flat metrics.

    ``spec`` takes :func:`sft`'s keyword names (``steps`` required; ``data`` defaults to
    ``translation=0.8,general=0.2``, ``mode`` to ``experts``). A LoRA run is always merged into
    the weights, so ``model`` stays a plain transformers model. No progress bar.
    """
    spec = dict(spec or {})
    if "sft" in spec and isinstance(spec["sft"], Mapping):
        spec = dict(spec["sft"])
    unknown = sorted(set(spec) - RECOVER_KEYS)
    if unknown:
        raise MoeSlimError(f"unknown key(s) {', '.join(unknown)} in recover.sft (known: {', '.join(sorted(RECOVER_KEYS))})")
    if "steps" not in spec:
        raise MoeSlimError("recover.sft needs steps (e.g. recover: {sft: {steps: 200}})")
    data = spec.pop("data", DEFAULT_RECOVER_DATA)
    result = sft(model, tok, data, data_dir=data_dir, progress=False, merge_lora=True, **spec)
    if result.model is not model:  # merge_and_unload hands back the same base module; be safe anyway
        model.load_state_dict(result.model.state_dict())
    return result.metrics()
