"""Loading checkpoints the way every command needs them: offline, with one-line errors."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
)

from ..errors import MoeSlimError


def load_config(path: str | os.PathLike) -> Any:
    """The transformers config of a checkpoint directory, or a one-line error."""
    from .hub import resolve_model

    p = resolve_model(path)
    if p.is_dir() and not (p / "config.json").exists():
        raise MoeSlimError(f"{p} is not a model checkpoint: it has no config.json")
    try:
        return AutoConfig.from_pretrained(str(p))
    except Exception as exc:  # transformers raises many types for unreadable configs
        raise MoeSlimError(f"{p} is not a readable transformers checkpoint: {str(exc).splitlines()[0]}") from exc


DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """``--dtype``: ``auto``/None (the checkpoint's own dtype) -> None, else a torch dtype; one-line errors."""
    if text is None or isinstance(text, torch.dtype):
        return text
    t = str(text).strip().lower().removeprefix("torch.")
    if t in ("", "auto"):
        return None
    if t not in DTYPES:
        raise MoeSlimError(f"unknown dtype '{text}' (choose from: auto, bfloat16, float16, float32)")
    return DTYPES[t]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str | os.PathLike) -> None:
    """A one-line error when a checkpoint directory holds only pickled weights (unpickling runs code)."""
    p = Path(path)
    if not p.is_dir() or any(p.glob("*.safetensors")) or any(p.glob("*.gguf")):
        return
    pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickled:
        # the paths as Python string literals, the code as one shell word: any path pastes safely
        code = (f"from transformers import AutoModel; AutoModel.from_pretrained({json.dumps(str(p))}, "
                f"use_safetensors=False).save_pretrained({json.dumps(str(p) + '-safetensors')})")
        raise MoeSlimError(
            f"{p} holds only pickled weights ({pickled[0]}); moe_slim reads safetensors only, since unpickling a file "
            f"can run code. If you trust it, convert it once: python -c {shlex.quote(code)}")


@contextmanager
def load_report() -> Iterator[list[str]]:
    """transformers' loading report, which it logs as a warning and then raises "look at the CONVERSION
    entries of the above report" about: kept here (the commands silence transformers' warnings, so the
    report was never seen), and passed on as before once loading is over."""
    log = logging.getLogger("transformers.modeling_utils")
    records: list[logging.LogRecord] = []
    messages: list[str] = []
    keep = logging.Handler(logging.WARNING)
    keep.emit = lambda r: (records.append(r), messages.append(r.getMessage()))  # type: ignore[method-assign]
    shown, level, propagate = log.isEnabledFor(logging.WARNING), log.level, log.propagate
    log.setLevel(logging.WARNING)
    log.propagate = False
    log.addHandler(keep)
    try:
        yield messages
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
        log.propagate = propagate
        for r in records if shown else []:
            log.handle(r)


def load_error_cause(exc: BaseException, report: list[str]) -> str:
    """The first line of a failed load's cause: the error inside transformers' report when it points there
    (FP8 weights whose shape the block-scale grid does not divide), else the exception's own first line."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "report" in first:
        found = re.search(r"^\s*\w*(?:Error|Exception): (.+)$", "\n".join(report), flags=re.M)
        if found:
            return found.group(1).strip()
    return first


def load_model(
    path: str | os.PathLike,
    *,
    device_map: str | dict | None = None,
    dtype: torch.dtype | str | None = None,
    offload_folder: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a checkpoint and its tokenizer (if any), in eval mode.

    Encoder-decoder checkpoints load as seq2seq models, image-text models through their own class (vision
    tower included: commands calibrate their language model on text), everything else as causal LMs.
    ``device_map`` is passed to accelerate (e.g. ``"auto"`` with CPU/disk offload); ``device`` puts
    the whole model on one device. ``dtype``: ``auto``/None is float32 on CPU-only machines (bf16/fp16
    run slowly and less exactly there) and the checkpoint's own dtype otherwise.
    """
    from .hub import resolve_model

    path = resolve_model(path)
    config = load_config(path)
    require_safetensors(path)
    from ..families import auto_class

    auto = auto_class(config)
    dtype = parse_dtype(dtype)
    if dtype is None and not torch.cuda.is_available():
        dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype or "auto", "use_safetensors": True}
    if device_map is None and device is not None and torch.device(device).type != "cpu":
        device_map = {"": str(device)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    with load_report() as report:
        try:
            model = auto.from_pretrained(str(path), **kwargs)
        except Exception as exc:
            raise MoeSlimError(f"could not load model {path}: {load_error_cause(exc, report)}") from exc
    model.eval()
    from .dispatch import prepare_model
    from .mtp import attach_from_checkpoint

    attach_from_checkpoint(model, path, load=True)  # MTP layers transformers skips are part of the checkpoint
    prepare_model(model)
    return model, load_tokenizer(path)


def load_tokenizer(path: str | os.PathLike) -> Any | None:
    """The checkpoint's tokenizer, or None when it ships none."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
