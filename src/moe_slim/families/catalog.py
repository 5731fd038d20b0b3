"""Which model types of the installed transformers are MoE: enumerated from transformers itself.

A model type is MoE when its modeling module defines an ``*Experts`` class; the auto mappings say
whether it is a causal LM, an encoder-decoder or an image-text model (whose language model is what
moe_slim slims). A family transformers adds later appears here without a code change.
"""

from __future__ import annotations

import functools
import importlib
import inspect


@functools.lru_cache(maxsize=1)
def moe_model_types() -> dict[str, str]:
    """``model_type -> kind`` ("causal", "seq2seq" or "image-text") for every MoE of transformers."""
    from transformers.models.auto import modeling_auto as ma

    mappings = (("causal", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), ("seq2seq", ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                ("image-text", ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))
    out: dict[str, str] = {}
    for kind, mapping in mappings:
        for model_type in mapping:
            if model_type in out:
                continue
            mod = model_type.replace("-", "_")
            try:
                module = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
            except Exception:  # a model whose optional dependencies are missing: not enumerable here
                continue
            if any(n.endswith("Experts") and inspect.isclass(getattr(module, n)) for n in vars(module)):
                out[model_type] = kind
    return dict(sorted(out.items()))


def text_model_type(model_type: str) -> str | None:
    """The causal-LM model type that holds a model type's language model (itself for text models)."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto as ma

    config = AutoConfig.for_model(model_type)
    sub = getattr(config, "text_config", None)
    if sub is not None and sub.model_type in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and sub.model_type != model_type:
        return sub.model_type
    causal = {**ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    return model_type if model_type in causal and sub is None else None


def family_rows() -> list[tuple[str, str, str]]:
    """``(model_type, status, what differs)`` for every MoE of transformers: the README table and
    ``moe-slim families`` both print these."""
    from .table import QUIRKS, REFUSED, UNTESTED

    rows = []
    for model_type, kind in moe_model_types().items():
        text = model_type if kind != "image-text" else f"{model_type} (language model)"
        if model_type in REFUSED:
            rows.append((text, "refused", REFUSED[model_type]))
        elif model_type in UNTESTED:
            rows.append((text, "found from structure, untested", UNTESTED[model_type]))
        else:
            notes = next((QUIRKS[k]["notes"] for k in (model_type, f"{model_type}_text") if "notes" in QUIRKS.get(k, {})),
                         "standard shape: fused experts beside a router weight[E, H]")
            if kind == "image-text":
                notes = f"whole image-text checkpoint, vision tower copied as it is; language model: {notes}"
            rows.append((text, "tested end to end", notes))
    return rows


def markdown_table() -> str:
    lines = ["| model type | status | what differs |", "|---|---|---|"]
    lines += [f"| `{mt}` | {status} | {notes} |" for mt, status, notes in family_rows()]
    return "\n".join(lines)
