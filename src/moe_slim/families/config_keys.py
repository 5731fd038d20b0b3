"""Where a config keeps a MoE's counts: an image-text model's nested ``text_config``, a dotted key into a
sub-config (DBRX ``ffn_config.moe_num_experts``). Read and written the same way by every path."""

from __future__ import annotations

from typing import Any


def text_config(config: Any) -> Any:
    """The config that holds the language model's keys (expert count, top-k, groups): an image-text model's
    ``text_config``, which its ``config.json`` nests, else the config itself."""
    sub = getattr(config, "text_config", None)
    return config if sub is None else sub


def config_value(config: Any, key: str | None) -> Any:
    """``config.a.b`` for a dotted key ``a.b`` (a count in a sub-config: DBRX ``ffn_config.moe_num_experts``)."""
    obj: Any = config
    for part in str(key).split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj


def set_config_value(config: Any, key: str, value: Any) -> None:
    """Set ``config.a.b`` for a dotted key ``a.b`` (the sub-config object itself, so it is saved with it)."""
    owner_key, _, leaf = key.rpartition(".")
    owner = config_value(config, owner_key) if owner_key else config
    if isinstance(owner, dict):
        owner[leaf] = value
    else:
        setattr(owner, leaf, value)
