"""MoE families: found from each model's module structure (:mod:`.discover`), with a table of what
structure cannot tell (:mod:`.table`). The ONLY place that knows model classes; everything else in
moe_slim works on :class:`MoeLayer` handles."""

from .discover import family_of, find_blocks, moe_layers
from .family import (
    SWIGLU_NEURONS,
    Family,
    MoeLayer,
    NeuronAxis,
    check_uniform,
    expert_axis,
    get_path,
    group_size_ok,
    kept_rows,
    set_config_counts,
    set_expert_count,
    take_experts,
    text_config,
)
from .skeleton import auto_class, non_text_parts, skeleton
from .table import QUIRKS, REFUSED, SLICEABLE_QUANTIZATION

__all__ = [
    "QUIRKS", "REFUSED", "SLICEABLE_QUANTIZATION", "SWIGLU_NEURONS", "Family", "MoeLayer", "NeuronAxis",
    "check_uniform", "expert_axis", "family_of", "find_blocks", "get_path", "group_size_ok", "kept_rows", "moe_layers",
    "set_config_counts", "set_expert_count", "skeleton", "take_experts", "auto_class", "non_text_parts", "text_config",
]
