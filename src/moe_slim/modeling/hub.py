"""MODEL as a local directory or a Hugging Face Hub id (``Qwen/Qwen3-30B-A3B``), as REAP, mergekit and
lm-eval take it. A local path always wins; an id is fetched with ``huggingface_hub.snapshot_download``
(safetensors, configs and tokenizer files only) into the hub cache, or found there when offline."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import MoeSlimError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: what a checkpoint needs; never pickled weights, never the original/ directories some repos carry
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in
               ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(spec: str | os.PathLike) -> Path:
    """A local checkpoint directory for ``spec``; one-line errors for missing paths and unreachable ids."""
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if not REPO_ID.match(text):
        raise MoeSlimError(f"model {path} does not exist (give a checkpoint directory with config.json, or a "
                           "Hugging Face Hub id such as Qwen/Qwen3-30B-A3B)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except Exception:  # not in the local cache
        pass
    if offline():
        raise MoeSlimError(f"{text} is not a local directory, and as a Hugging Face Hub id it needs the hub, which is "
                           f"offline here (HF_HUB_OFFLINE=1); download it where you are online "
                           f"(huggingface-cli download {text}) and give its directory")
    try:
        return Path(snapshot_download(text, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many kinds (not found, gated, network)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoeSlimError(f"could not get {text} from the Hugging Face hub: {first}") from exc
