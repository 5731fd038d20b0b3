"""The choices a merge leaves open, as small functions: whose router row a merged expert keeps,
REAM's default group size, merge weights, and the tokens that align neurons.

These are moe_slim's choices where the papers are silent or do not shrink the model:

* **Router row** (``router_row``). The published HC-SMoE and M-SMoE code never slice the router: every
  member of a group is bound to the one merged expert, so every member's row still routes to it
  (``tied=True`` reproduces that). A shrinking merge keeps one row per group, and which one matters:
  HC-SMoE's "member nearest the cluster mean" is often an expert the router almost never picks, which
  makes the merged expert unreachable. So a merged expert keeps the row of its group's most
  frequently routed member (``"frequency"``) or its most REAP-salient member (``"saliency"``).
  Defaults: ``saliency`` for REAM and average (REAM's centroid is the most salient member), ``frequency``
  for HC-SMoE and M-SMoE (M-SMoE's dominant is the most frequent member). ``"method"`` keeps the
  method's own representative (HC-SMoE: nearest the cluster mean, as in the paper).
* **REAM's group size C** (:func:`default_group_size`): ``max(2, round(E / 8), ceil(E / E'))``. REAM fixed
  C = 16 for 128-expert models; E / 8 keeps that ratio for other expert counts (16 experts: C = 2,
  i.e. pairs), and C is never smaller than what covering E experts with E' groups needs.
* **Alignment tokens** (:func:`align_rows`): drawn at random (seeded) from the whole sample, so every
  calibration domain is represented (a prefix of the sample would hold the first domain only).
"""

from __future__ import annotations

import math

import torch

from ...errors import MoeSlimError
from ...outputs import note

ROUTER_ROWS: tuple[str, ...] = ("frequency", "saliency", "method")
WEIGHTINGS: tuple[str, ...] = ("saliency", "ream-repo", "frequency", "uniform")
ALIGNS: tuple[str, ...] = ("ream", "weights", "none")


def default_router_row(grouping: str) -> str:
    return "saliency" if grouping == "ream" else "frequency"


def check_choice(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise MoeSlimError(f"unknown {name} '{value}' (choose from: {', '.join(allowed)})")


def order_groups(groups: list[list[int]], rule: str, frequency: torch.Tensor, saliency: torch.Tensor
                 ) -> list[list[int]]:
    """Each group with the member whose router row survives first (ties: the method's own first member)."""
    if rule == "method":
        return [list(g) for g in groups]
    score = frequency if rule == "frequency" else saliency
    out = []
    for g in groups:
        rep = max(g, key=lambda m: (float(score[m]), -g.index(m)))
        out.append([rep] + [m for m in g if m != rep])
    return out


def default_group_size(n_experts: int, k: int, n_group: int = 1) -> int:
    """REAM's C for ``n_experts`` experts merged to ``k`` (per router group when routing is group-limited)."""
    per_e, per_k = n_experts // n_group, max(1, k // n_group)
    return max(2, int(round(n_experts / 8)), -(-per_e // per_k))


def warn_group_size(group_size: int, n_experts: int) -> None:
    if group_size >= n_experts:
        note(f"REAM group size C={group_size} is at least the expert count ({n_experts}): one group may swallow "
             f"every expert (REAM's C=16 was sized for 128 experts; the default here is max(2, round(E/8)))")


def align_rows(n_rows: int, n_take: int, seed: int) -> torch.Tensor:
    """``min(n_take, n_rows)`` row indices drawn uniformly at random (seeded) from the whole sample, sorted."""
    if n_take >= n_rows:
        return torch.arange(n_rows)
    g = torch.Generator().manual_seed(seed * 7_777 + 17)
    return torch.randperm(n_rows, generator=g)[:n_take].sort().values


def pca_rows(a: torch.Tensor, b: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both neuron-feature matrices projected on the top ``dims`` principal axes of their union (REAM: 64)."""
    if dims <= 0 or a.shape[1] <= dims:
        return a, b
    both = torch.cat([a, b]).double()
    mean = both.mean(0, keepdim=True)
    q = min(dims, both.shape[0], both.shape[1])
    with torch.random.fork_rng(devices=[]):  # pca_lowrank draws a random projection: seeded, so merges replay
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(both - mean, q=q, center=False, niter=4)
    proj = (both - mean) @ v
    return proj[: a.shape[0]].float(), proj[a.shape[0]:].float()


def group_weights(groups: list[list[int]], weighting: str, frequency: torch.Tensor, saliency: torch.Tensor,
                  p2norm: torch.Tensor | None = None) -> list[list[float]]:
    """Merge weights per group (each sums to 1)."""
    if weighting == "uniform":
        return [[1.0 / len(g)] * len(g) for g in groups]
    if weighting == "frequency":
        s = frequency.double()
        return [_normalise([float(s[m]) for m in g]) for g in groups]
    s = (p2norm if weighting == "ream-repo" else saliency).double().clone()
    pos = s[s > 0]
    s[s <= 0] = float(pos.min()) if pos.numel() else 1.0  # REAM: unused experts still count a little
    return [_normalise([float(s[m]) for m in g]) for g in groups]


def _normalise(values: list[float]) -> list[float]:
    total = sum(values)
    if total <= 0 or not math.isfinite(total):
        return [1.0 / len(values)] * len(values)
    return [v / total for v in values]
