"""Cut a transformers config to fewer layers, keeping every kind of layer it has.

Which fields are per layer is asked of the config class itself: a list whose length follows
``num_hidden_layers`` when the class builds a config of another depth (``layer_types``,
``mlp_layer_types``, ``indexer_types``, ...), and the per-layer overrides of a heterogeneous config
(``per_layer_config``, e.g. dots3's sliding-attention layers with their own head counts). A list that
merely happens to be as long as the stack is left alone, and a list of layer indices (Llama-4's
``moe_layers``) is renumbered rather than cut. The kept layers are chosen together over every
per-layer field, so a layer keeps its own combination (attention kind, MLP kind, overrides).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig


def config_dict(config: Any) -> dict[str, Any]:
    """``config.to_dict()``, with the global values of per-layer attributes (a heterogeneous config hides them)."""
    allowed = config.allow_global_per_layer_attribute_access
    config.allow_global_per_layer_attribute_access = True
    try:
        return config.to_dict()
    finally:
        config.allow_global_per_layer_attribute_access = allowed


def per_layer_lists(model_type: str, d: dict[str, Any], depth: int) -> list[str]:
    """The list fields of ``d`` (a default config of ``depth`` layers) that the class sizes per layer."""
    probe = depth + 1
    try:
        other = config_dict(AutoConfig.for_model(model_type, num_hidden_layers=probe))
    except Exception:  # a class that cannot build another depth: fall back on the length alone
        other = {k: [None] * probe for k, v in d.items() if isinstance(v, list) and len(v) == depth}
    return [k for k, v in d.items() if k != "rope_parameters" and isinstance(v, list) and len(v) == depth
            and isinstance(other.get(k), list) and len(other[k]) == probe]


def layer_overrides(d: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``layer index -> overrides`` of a heterogeneous config (empty for a homogeneous one)."""
    return {int(i): dict(v) for i, v in (d.get("per_layer_config") or {}).items()}


def _is_index_list(values: list[Any], depth: int) -> bool:
    """Layer indices (ascending, each below ``depth``) rather than one value per layer."""
    return (bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            and all(a < b for a, b in zip(values, values[1:])) and 0 <= values[0] and values[-1] < depth)


def kept_layers(signatures: list[Any], n: int) -> list[int]:
    """Indices of ``n`` layers: the first ``n``, with repeated kinds at the end traded for the first
    layer of each kind that would otherwise be lost (a hybrid stack keeps a full-attention layer)."""
    head = list(range(min(n, len(signatures))))
    for kind in dict.fromkeys(signatures):
        kinds = [signatures[i] for i in head]
        if kind in kinds:
            continue
        spare = next((p for p in reversed(range(len(head))) if kinds.count(kinds[p]) > 1), None)
        if spare is None:
            break
        head[spare] = signatures.index(kind)
    return head


def cut_layers(d: dict[str, Any], lists: list[str], depth: int,
               n: int) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The per-layer fields of a ``depth``-layer config for ``n`` kept layers: ``(lists, overrides)``.

    Index lists are renumbered over the kept layers; the overrides are keyed by new layer index."""
    per_layer = [k for k in lists if not _is_index_list(d[k], depth)]
    overrides = layer_overrides(d)
    signatures = [tuple(str(d[k][i]) for k in per_layer) + (repr(sorted(overrides.get(i, {}).items())),)
                  for i in range(depth)]
    keep = kept_layers(signatures, n)
    out: dict[str, Any] = {k: [d[k][i] for i in keep] for k in per_layer}
    out.update({k: [new for new, i in enumerate(keep) if i in d[k]] for k in lists if k not in per_layer})
    return out, {new: overrides[i] for new, i in enumerate(keep) if i in overrides}
