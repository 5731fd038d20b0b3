"""MODEL as a local directory or a Hugging Face Hub id (``Qwen/Qwen3-30B-A3B``), as REAP, mergekit and
lm-eval take it. A local path always wins; an id is fetched with ``huggingface_hub.snapshot_download``
(safetensors, configs and tokenizer files only) into the hub cache, or found there when offline."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from ..errors import MoeSlimError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: what a checkpoint needs; never pickled weights, never the original/ directories some repos carry
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in
               ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


PROBE_SECONDS = 3.0
_probed: dict[str, str | None] = {}


def go_offline() -> None:
    """Switch this process's hub clients to offline mode (cached files are used, nothing is retried)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # read at its import; later imports see the environment
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be used from here, or None when it can: switched off by the
    environment, or one connection to it that did not open within a few seconds (instead of the hub
    clients' minute of retries, line by line). An unreachable hub switches the process offline, so files
    already cached are still used."""
    if _probed.get("why"):  # found unreachable before (and switched offline since)
        return _probed["why"]
    if offline():
        return "offline here (HF_HUB_OFFLINE=1)"
    if "why" not in _probed:
        url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            _probed["why"] = None
        except OSError as exc:
            _probed["why"] = f"not reachable from here ({host}:{port}: {exc or 'no answer'})"
            go_offline()
    return _probed["why"]


def _dataset_caches() -> tuple[Path, Path]:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE), Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")


def dataset_cached(repo: str | None = None) -> bool:
    """Whether a hub dataset (any, when ``repo`` is None) has been downloaded into this machine's caches."""
    hub, legacy = _dataset_caches()
    if repo is None:
        return any(hub.glob("datasets--*")) or any(legacy.glob("*___*"))
    return (hub / f"datasets--{repo.replace('/', '--')}").is_dir() or (legacy / repo.replace("/", "___")).is_dir()


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
    why = hub_unavailable()
    if why:
        raise MoeSlimError(f"{text} is not a local directory, and as a Hugging Face Hub id it needs the hub, which is "
                           f"{why}; download it where you are online (huggingface-cli download {text}) and pass its "
                           "local directory")
    try:
        return Path(snapshot_download(text, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many kinds (not found, gated, network)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoeSlimError(f"could not get {text} from the Hugging Face hub ({first}); or pass a local directory"
                           ) from exc
