"""The recovery stage ``recover: {sft: {...}}`` of sweeps and recipes: fine-tune a pruned or merged model
in memory, with the stage's keys checked by a pydantic model before any work.

``loss: kd`` (or ``kd+ce``) distils from ``teacher: source``, the model the sweep or recipe started from
(the unpruned one), which is the only teacher a stage can name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AliasChoices, Field
from torch import nn

from ..schema import NonNegativeInt, PositiveInt, Strict, validate
from ..errors import MoeSlimError
from .distill import LOSSES
from .loop import SCHEDULERS, sft
from .modes import MODES

DEFAULT_RECOVER_DATA = "translation=0.8,general=0.2"


class SftStage(Strict):
    """The keys of ``recover: {sft: ...}``: :func:`~moe_slim.recover.loop.sft`'s keyword names."""

    steps: PositiveInt
    data: str | dict[str, float] = Field(DEFAULT_RECOVER_DATA, validation_alias=AliasChoices("mix", "data"))
    mode: Literal[MODES] = "experts"  # type: ignore[valid-type]
    lr: float | None = Field(None, gt=0)
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    seq_len: PositiveInt = 256
    warmup: float = Field(0.1, ge=0)
    scheduler: Literal[SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    weight_decay: float = Field(0.0, ge=0)
    eval_every: PositiveInt | None = None
    val_examples: PositiveInt = 64
    patience: PositiveInt | None = 3
    seed: NonNegativeInt = 0
    lora_r: PositiveInt = 16
    lora_alpha: PositiveInt = 32
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_experts: bool = False
    chrf_limit: NonNegativeInt | None = None
    max_minutes: float | None = Field(None, gt=0)
    loss: Literal[LOSSES] = "ce"  # type: ignore[valid-type]
    teacher: Literal["source"] = "source"  # what kd distils from: the sweep's or recipe's source model
    kd_weight: float = Field(0.5, ge=0, le=1)

    def sft_kwargs(self) -> dict[str, Any]:
        """The keys set in the spec, as :func:`sft` keywords (the rest keep sft's own defaults); the caller
        passes the teacher."""
        out = self.model_dump(exclude_unset=True, exclude={"data", "teacher"})
        if "warmup" in out and out["warmup"] >= 1:
            out["warmup"] = int(out["warmup"])
        return out




def recover(model: nn.Module, tok: Any, spec: Mapping[str, Any] | None, data_dir: str | os.PathLike | None = None,
            source: nn.Module | None = None) -> dict[str, float]:
    """Fine-tune ``model`` in place as ``spec`` says (``{sft: {steps: N, ...}}`` or its inner mapping) and
    return flat metrics. A LoRA run is always merged into the weights, so ``model`` stays a plain
    transformers model. No progress bar. ``source``: the unpruned model, the teacher of ``loss: kd``.
    """
    raw = dict(spec or {})
    if "sft" in raw and isinstance(raw["sft"], Mapping):
        raw = dict(raw["sft"])
    stage = validate(SftStage, raw, "recover.sft")
    if stage.loss != "ce" and source is None:
        raise MoeSlimError(f"recover.sft: loss {stage.loss} needs the source model as teacher")
    result = sft(model, tok, stage.data, data_dir=data_dir, progress=False, merge_lora=True,
                 teacher=source if stage.loss != "ce" else None, **stage.sft_kwargs())
    if result.model is not model:  # merge_and_unload hands back the same base module; be safe anyway
        model.load_state_dict(result.model.state_dict())
    return result.metrics()
