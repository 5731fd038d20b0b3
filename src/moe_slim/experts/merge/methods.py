"""The merge methods as data: grouping, alignment, weighting and router rule of each.

=========  =============================================  ==================  ==========  ================
method     grouping                                       alignment           weights     router row
=========  =============================================  ==================  ==========  ================
ream       k most REAP-salient centroids; in saliency     Hungarian on        p^2*||f||   centroid
           order each takes up to C-1 most similar        activations +       over all
           unassigned experts (similarity: gated mean     weight vectors      sample
           outputs and router-logit columns)              (PCA per pair)      tokens
hc-smoe    average-linkage clustering of mean outputs     none                frequency   representative
m-smoe     k most frequent experts dominate; the others   weight matching     frequency   dominant
           join the one with the most similar router
           logits
average    as ream (override with ``grouping=``)          none                uniform     centroid
=========  =============================================  ==================  ==========  ================

Each reference's own defaults are presets of :class:`~.config.MergeOptions` (``ream-repo``: routed-token
p^2*||f|| for weights and centroids, one PCA per layer, C = 16, sequential).

HC-SMoE's own "representative" is the member whose mean output is closest to the cluster's mean;
which member's router row a merged expert keeps is a separate choice (:mod:`.options`: by default
the most frequent member for HC-SMoE and M-SMoE, the most salient for REAM and average). It takes
that member's whole router row: weight row, router bias entry and DeepSeek-V3's
``e_score_correction_bias`` entry.
Shared experts are never touched. Group-limited routers merge within their router groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import MoeSlimError
from ...families import (
    Family,
    group_size_ok,
)

METHODS: tuple[str, ...] = ("ream", "hc-smoe", "m-smoe", "average")
GROUPINGS: tuple[str, ...] = ("ream", "hc", "msmoe")
DEFAULT_SAMPLE_TOKENS = 32_000
DEFAULT_ALIGN_TOKENS = 8192


@dataclass(frozen=True)
class MethodSpec:
    grouping: str  # "ream" | "hc" | "msmoe"
    align: str  # "ream" (activations + weights) | "weights" (weight matching) | "none"
    weighting: str  # "saliency" (REAP) | "p2norm-routed" | "p2norm-all" (mean p^2 * ||f||) | "frequency" | "uniform"
    router: str  # which member's router row the merged expert keeps


SPECS: dict[str, MethodSpec] = {
    # REAM weighs by p^2*||f|| over all sample tokens (ours; the repository's default averages it over the routed
    # tokens: weighting p2norm-routed); chosen by measurement, README "Merging: REAM variants"
    "ream": MethodSpec("ream", "ream", "p2norm-all", "centroid (most salient member)"),
    "hc-smoe": MethodSpec("hc", "none", "frequency", "representative (member closest to the cluster's mean output)"),
    "m-smoe": MethodSpec("msmoe", "weights", "frequency", "dominant (most frequent member)"),
    "average": MethodSpec("ream", "none", "uniform", "centroid (most salient member)"),
}


def _check_request(family: Family, config: Any, n_experts: int, k: int, spec: MethodSpec, group_size: int) -> None:
    top_k = family.top_k(config)
    if k < top_k:
        raise MoeSlimError(f"merging {n_experts} experts to {k} per layer leaves fewer than top-k={top_k} "
                           "(use a smaller ratio)")
    why = group_size_ok(family, config, k)
    if why:
        raise MoeSlimError(f"cannot merge to {k} experts per layer: {why}")
    if spec.grouping == "ream":
        if group_size < 1:
            raise MoeSlimError(f"--group-size must be at least 1 (got {group_size})")
        groups = family.groups(config)
        n_group = groups[0] if groups else 1
        per_k, per_e = k // n_group, n_experts // n_group
        if per_k * group_size < per_e:
            raise MoeSlimError(f"REAM groups of at most {group_size} experts around {k} centroids cannot hold "
                               f"{n_experts} experts (use --group-size {-(-per_e // per_k)} or more)")


def method_spec(method: str, grouping: str | None = None) -> MethodSpec:
    if method not in SPECS:
        raise MoeSlimError(f"unknown merge method '{method}' (choose from: {', '.join(METHODS)})")
    spec = SPECS[method]
    if grouping is not None:
        if grouping not in GROUPINGS:
            raise MoeSlimError(f"unknown grouping '{grouping}' (choose from: {', '.join(GROUPINGS)})")
        spec = MethodSpec(grouping, spec.align, spec.weighting, spec.router)
    return spec


def samples_hint(model_path: str = "MODEL") -> str:
    return (f"run `moe-slim observe {model_path} --calib SPEC --samples 32k --out STATS` and merge with those "
            "stats, or merge with --calib")
