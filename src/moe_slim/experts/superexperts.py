"""Super-experts: the few experts whose largest output is an outlier for the whole model.

REAP's reference code can exclude "super experts" (Su et al., 2025: experts whose extreme activations
the model relies on, e.g. for attention sinks) from pruning. We find them from statistics we already
keep, ``norm_max`` (the largest ||expert output|| seen on any routed token, a max per domain):

    super(l, e)  <=>  z(l, e) = (log norm_max(l, e) - median) / (1.4826 * MAD) > z_min   (default 3.5)

median and MAD (median absolute deviation) over every expert of the model that was routed at all, so
the rule is robust to the outliers it looks for; 3.5 is the usual cut for a robust z-score (Iglewicz &
Hoaglin). Protected experts are never removed (pruning, MoNE) nor merged into another (merging: each
stays a group of its own).
"""

from __future__ import annotations

import torch

from .stats import RouterStats

DEFAULT_Z = 3.5


def super_experts(stats: RouterStats, mix: dict[str, float] | None = None, z_min: float = DEFAULT_Z) -> torch.Tensor:
    """``[layer, expert]`` bool: which experts are super-experts on the domains of ``mix``."""
    s = stats.mix(mix)
    mx = s.norm_max
    seen = mx > 0
    if int(seen.sum()) < 3:
        return torch.zeros_like(mx, dtype=torch.bool)
    logs = mx[seen].log()
    med = logs.median()
    mad = (logs - med).abs().median().clamp_min(1e-12) * 1.4826
    z = torch.full_like(mx, -float("inf"))
    z[seen] = (logs - med) / mad
    return z > z_min


def protect_scores(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Scores in which every protected expert outranks every other expert of its layer."""
    out = scores.clone().double()
    top = out.abs().amax(1, keepdim=True) + 1
    return torch.where(protected, out + 2 * top, out)
