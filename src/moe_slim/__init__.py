"""moe_slim: make Mixture-of-Experts language models smaller.

The folders follow the pipeline: :mod:`.experts` (observe -> statistics -> criteria -> plan ->
prune or merge), :mod:`.checkpoint` (writing outputs), :mod:`.evals`, :mod:`.recover` (short SFT),
:mod:`.sweep` (grids, results, reports), :mod:`.dense` (ProbScale), :mod:`.reference` (the shipped
reference MoE) and :mod:`.cli`. The public Python API is :mod:`moe_slim.api`; its main names are
importable from here as well (loaded on first use, so ``import moe_slim`` stays cheap).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "load_model": "moe_slim.modeling.loading",
    "observe": "moe_slim.experts.observe",
    "RouterStats": "moe_slim.experts.stats",
    "ExpertPlan": "moe_slim.experts.plan",
    "apply_plan": "moe_slim.experts.prune",
    "merge_model": "moe_slim.experts.merge.driver",
    "apply_merge_plan": "moe_slim.experts.merge.apply",
    "evaluate": "moe_slim.evals.run",
    "sft": "moe_slim.recover.loop",
    "plan_for": "moe_slim.api",
    "observe_checkpoint": "moe_slim.api",
    "prune_checkpoint": "moe_slim.api",
    "apply_checkpoint": "moe_slim.api",
    "merge_checkpoint": "moe_slim.api",
    "sft_checkpoint": "moe_slim.api",
    "oneshot": "moe_slim.recipe.run",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'moe_slim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
