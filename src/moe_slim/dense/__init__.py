"""ProbScale: probe-guided layer selection (and removal) for dense and MoE language models.

After ProbeScale (arXiv 2606.01806): train a cross-validated linear probe per layer and task, turn
the probe-performance matrix into a relevance per layer, keep the layer subset of maximum
task-weighted relevance under a parameter budget (an exact knapsack DP, optionally contiguous),
fit retention against retained parameters with a saturating power law, and write the slimmed
checkpoint.

Modules, one idea each: :mod:`.family` (where layers live, per model family), :mod:`.tasks`,
:mod:`.features` (pooled hidden states, Block Influence), :mod:`.probes` (P[layer, task]),
:mod:`.select` (relevance, DP, nearest achievable plans, baselines), :mod:`.scaling` (curve fit and its
reliability), :mod:`.slim` (layer removal, config re-mapping, checkpoints), :mod:`.plots`, :mod:`.pipeline`
(the ``probe`` run), :mod:`.measure` (the slimmed model's own outputs), :mod:`.heal` (distillation or SFT
after removal), :mod:`.compare` (every plan before/after equal healing, paired bootstrap).
"""

from __future__ import annotations

from .family import (
    FAMILIES,
    family_for,
    family_for_config,
    layer_param_counts,
    stack_layers,
    supported_model_types,
)
from .compare import compare_methods
from .features import Features, extract_features
from .heal import heal
from .measure import OwnOutputs, paired_difference, retention
from .pipeline import Measurer, run_probe, scaling_sweep
from .probes import ProbeMatrix, final_scores, probe_matrix, probe_score
from .scaling import ScalingFit, fit_scaling
from .select import (
    Selection,
    all_selections,
    angular_selection,
    block_influence_selection,
    last_layers_selection,
    layer_relevance,
    parse_budget,
    random_selection,
    select_filled,
    select_layers,
)
from .slim import apply_plan, load_dense, make_plan, read_plan, save_slimmed, slim_model
from .tasks import (
    BUILTIN_TASKS,
    Task,
    builtin_task,
    load_tasks,
    parse_weights,
    read_task_file,
)

__all__ = [
    "BUILTIN_TASKS", "FAMILIES", "Features", "Measurer", "OwnOutputs", "ProbeMatrix", "ScalingFit", "Selection", "Task",
    "angular_selection", "compare_methods", "heal", "paired_difference", "retention", "select_filled",
    "all_selections", "apply_plan", "block_influence_selection", "builtin_task", "extract_features",
    "family_for", "family_for_config", "final_scores", "fit_scaling", "last_layers_selection", "layer_param_counts",
    "layer_relevance", "load_dense", "load_tasks", "make_plan", "parse_budget", "parse_weights", "probe_matrix",
    "probe_score", "random_selection", "read_plan", "read_task_file", "run_probe", "save_slimmed", "scaling_sweep",
    "select_layers", "slim_model", "stack_layers", "supported_model_types",
]
