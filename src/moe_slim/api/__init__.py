"""The Python API behind ``moe-slim observe | prune | apply | merge | sft``: checkpoint in, checkpoint out.

Each function validates everything it can before any heavy work and writes nothing on error. The
in-memory building blocks live in :mod:`moe_slim.experts` (observe, stats, criteria, plan, prune,
merge) and :mod:`moe_slim.recover`; the ones a README example needs are re-exported here.
"""

from __future__ import annotations

from ..experts.criteria import score
from ..experts.merge.apply import apply_merge_plan
from ..experts.merge.driver import merge_model
from ..experts.merge.plan import MergePlan
from ..experts.mone import install_novices, novice_plan
from ..experts.observe import observe
from ..experts.plan import ExpertPlan
from ..experts.prune import apply_plan
from ..experts.stats import RouterStats
from ..modeling.loading import load_model
from ..recover.loop import sft
from .merge import merge_checkpoint
from .mone import mone_checkpoint
from .observation import needs_layerwise, observe_checkpoint
from .plans import apply_plan_file, load_plan, parse_weights, plan_for, write_plan
from .prune import apply_checkpoint, prune_checkpoint
from .healing import sft_checkpoint

__all__ = [
    "ExpertPlan", "MergePlan", "RouterStats", "apply_checkpoint", "apply_merge_plan", "apply_plan", "apply_plan_file",
    "install_novices", "load_model", "load_plan", "merge_checkpoint", "merge_model", "mone_checkpoint", "needs_layerwise",
    "novice_plan", "observe", "observe_checkpoint",
    "parse_weights", "plan_for", "prune_checkpoint", "score", "sft", "sft_checkpoint", "write_plan",
]
