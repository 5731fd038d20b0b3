"""Fingerprints that make results and statistics traceable to a model, data and libraries."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import torch

_IGNORED_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "_commit_hash",
    "_attn_implementation", "_experts_implementation", "use_cache", "output_router_logits",
    "quantization_config", "name_or_path", "moe_slim",
}


def _stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config: Any) -> str:
    """Hash of the architecture-defining config fields (not paths, versions or dtypes)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _IGNORED_CONFIG_KEYS}
    return sha256_text(_stable_json(d))[:16]


def shapes_hash(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """Hash of every parameter's name and shape."""
    items = sorted((name, list(shape)) for name, shape in named_shapes)
    return sha256_text(_stable_json(items))[:16]


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """Config hash plus weight-shape hash: equal for the same architecture and sizes."""
    shapes = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    return {
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "config_hash": config_hash(model.config),
        "shapes_hash": shapes_hash(shapes),
    }


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of the weight values themselves (slow on large models; used for small ones)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the numbers depend on (a fresh dict each call)."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    """Read once per process: each metadata lookup parses a METADATA file (30 ms for the eight)."""
    out = {"python": platform.python_version()}
    for pkg in ("moe_slim", "torch", "transformers", "accelerate", "safetensors", "sacrebleu", "lm_eval", "datasets"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                continue
    return out
