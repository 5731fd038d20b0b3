"""The key/value cache argument of a model's forward, under its name in this transformers version.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (input and output) for the models it has
moved over, and warns on the old name; other families still take ``past_key_values``.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(model: Any) -> str:
    """``"cache"`` when the model's forward takes it, else ``"past_key_values"``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
