"""Writing a checkpoint: weights, tokenizer, model card and the plan's files, into a directory that
appears whole (:func:`moe_slim.outputs.atomic_dir`) or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..outputs import atomic_dir, pause_point


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    card: str,
    plan: Any = None,
    extra_json: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Save model, tokenizer, generation config, model card and plan into ``out``, atomically.

    ``plan`` (an :class:`~moe_slim.experts.plan.ExpertPlan` or a merge plan) must be writable as a
    standard checkpoint and writes its own files (``plan.json``, and a merge plan's permutations).
    ``dtype`` casts the floating-point weights first (moe_slim computes in float32 on CPUs and writes
    checkpoints in their source dtype: see :func:`moe_slim.modeling.loading.output_dtype`).
    """
    if plan is not None:
        plan.check_writable()
    if dtype is not None:
        model.to(dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), **({"max_shard_size": max_shard_bytes} if max_shard_bytes else {}))
        pause_point("after-first-file")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if plan is not None:
            plan.write_files(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(card)
    return Path(out)
