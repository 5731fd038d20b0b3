"""Writing a checkpoint: weights, tokenizer, model card and the plan's files, into a directory that
appears whole (:func:`moe_slim.outputs.atomic_dir`) or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modeling.ondisk import cast_like_source
from ..modeling.shards import has_safetensors
from ..outputs import atomic_dir, pause_point
from ..prompts import END_TAG

#: keys transformers writes into tokenizer_config.json that only describe the machine that saved it
MACHINE_LOCAL_KEYS = ("is_local", "local_files_only", "_commit_hash")


def tidy_checkpoint_files(directory: str | os.PathLike) -> None:
    """Make a written checkpoint portable and complete: drop machine-local keys from
    ``tokenizer_config.json``, and when the tokenizer has moe_slim's ``<|end|>`` tag, make
    ``generation_config.json`` stop there too (plain ``generate`` would otherwise run past it)."""
    d = Path(directory)
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text())
        if any(k in cfg for k in MACHINE_LOCAL_KEYS):
            tc.write_text(json.dumps({k: v for k, v in cfg.items() if k not in MACHINE_LOCAL_KEYS}, indent=2,
                                     ensure_ascii=False) + "\n")
    end_id = _token_id(d / "tokenizer.json", END_TAG)
    gc = d / "generation_config.json"
    if end_id is not None and gc.is_file():
        cfg = json.loads(gc.read_text())
        eos = cfg.get("eos_token_id")
        ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        if end_id not in ids:
            cfg["eos_token_id"] = ids + [end_id]
            gc.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _token_id(tokenizer_json: Path, token: str) -> int | None:
    if not tokenizer_json.is_file():
        return None
    try:
        added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
    except ValueError:
        return None
    return next((int(t["id"]) for t in added if t.get("content") == token), None)


def cast_for_output(model: nn.Module, dtype: torch.dtype | None, source: str | os.PathLike | None) -> None:
    """The dtypes a derived checkpoint is written in: ``dtype`` for every floating weight when asked, else each
    tensor's own dtype in the ``source`` checkpoint (F32 routers beside bf16 experts stay F32)."""
    if dtype is not None:
        model.to(dtype)
    elif source is not None and has_safetensors(source):
        cast_like_source(model, source)


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    card: str,
    plan: Any = None,
    extra_json: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    source: str | os.PathLike | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Save model, tokenizer, generation config, model card and plan into ``out``, atomically.

    ``plan`` (an :class:`~moe_slim.experts.plan.ExpertPlan` or a merge plan) must be writable as a
    standard checkpoint and writes its own files (``plan.json``, and a merge plan's permutations).
    ``dtype`` casts the floating-point weights first; without it, given the ``source`` checkpoint, every
    tensor is written in its own source dtype (moe_slim computes in float32 on CPUs; DeepSeek-V3 keeps
    F32 routers beside bf16 weights, and those stay F32).
    """
    if plan is not None:
        plan.check_writable()
    cast_for_output(model, dtype, source)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), **({"max_shard_size": max_shard_bytes} if max_shard_bytes else {}))
        pause_point("after-first-file")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if plan is not None:
            plan.write_files(tmp)
        tidy_checkpoint_files(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(card)
    return Path(out)
