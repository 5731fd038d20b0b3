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
* **REAM's group size C** (:func:`default_group_size`): ``max(min(16, E // 2), ceil(E / E'))`` (per router
  group when routing is group-limited). C = 16 is
  REAM's repository default; measured against our earlier ``round(E / 8)`` it was better on the reference
  model (32 experts) at 25% and 50% and on a 64-expert model at 25% (README "REAM: the repository's
  defaults and ours"). Ours: at most half the experts (unmeasured below 32 experts, where C = 16 would
  let one group take every expert), and never smaller than what covering E experts with E' groups needs.
* **Alignment tokens** (:func:`align_rows`): drawn at random (seeded) from the whole sample, so every
  calibration domain is represented (a prefix of the sample would hold the first domain only).
"""

from __future__ import annotations

import math

import torch

from ...outputs import note

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
    return max(min(16, per_e // 2), -(-per_e // per_k))


def warn_group_size(group_size: int, n_experts: int) -> None:
    if group_size >= n_experts:
        note(f"REAM group size C={group_size} is at least the expert count ({n_experts}): one group may swallow "
             f"every expert (the default is min(16, E/2))")


def align_rows(n_rows: int, n_take: int, seed: int) -> torch.Tensor:
    """``min(n_take, n_rows)`` row indices drawn uniformly at random (seeded) from the whole sample, sorted."""
    if n_take >= n_rows:
        return torch.arange(n_rows)
    g = torch.Generator().manual_seed(seed * 7_777 + 17)
    return torch.randperm(n_rows, generator=g)[:n_take].sort().values


def pca_rows(a: torch.Tensor, b: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pca="pair"`` (ours): both neuron-feature matrices projected on the top ``dims`` principal axes of
    their union, raw rows, no singular-value scaling."""
    if dims <= 0 or a.shape[1] <= dims:
        return a, b
    proj = _pca(torch.cat([a, b]), dims, scale=False)
    return proj[: a.shape[0]], proj[a.shape[0]:]


def pca_layer(features: torch.Tensor, dims: int) -> torch.Tensor:
    """``pca="layer"`` (REAM's repository, ``weight_utils.pca_reduce``): every expert's neuron rows ``[E, n, D]``
    normalised to unit length, one PCA for the whole layer, projected onto V·diag(s): ``[E, n, dims]``."""
    E, n, D = features.shape
    if dims <= 0 or D <= dims:
        return features
    rows = torch.nn.functional.normalize(features.float().reshape(E * n, D), dim=1, eps=1e-8)
    return _pca(rows, dims, scale=True).reshape(E, n, -1)


def _pca(x: torch.Tensor, dims: int, *, scale: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` centred and projected on its top ``dims`` principal axes: ``torch.pca_lowrank(niter=4)``'s
    randomised algorithm (Halko et al. 2009, Algorithm 5.1, as ``torch._lowrank`` runs it) from its seed-0
    float64 start, computed in ``dtype``. ``pca_lowrank`` itself draws its start in the input's dtype, and
    with no oversampling (q = dims) the last axes depend on that start: a float32 input changed a third
    of the alignments. The float64 start rounded to float32 keeps every alignment of the float64
    computation (costs within ~1e-6) at a quarter of its time; ``dtype=torch.float64`` gives
    ``pca_lowrank``'s projection (to rounding)."""
    centred = x.to(dtype)
    centred = centred - centred.mean(0, keepdim=True)
    q = min(dims, x.shape[0], x.shape[1])
    tall = centred if centred.shape[0] >= centred.shape[1] else centred.mT
    with torch.random.fork_rng(devices=[]):  # a seeded random start, so merges replay
        torch.manual_seed(0)
        start = torch.randn(tall.shape[1], q, dtype=torch.float64).to(dtype)
    basis = torch.linalg.qr(tall @ start).Q
    for _ in range(4):
        basis = torch.linalg.qr(tall.mT @ basis).Q
        basis = torch.linalg.qr(tall @ basis).Q
    small = basis.mT @ tall
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    if tall is centred:
        return centred @ (vh.mT * s.unsqueeze(0) if scale else vh.mT)
    # wide: the axes are ``basis @ u`` and ``small`` is ``(centred @ basis).T``, so the projection
    # ``centred @ basis @ u`` needs no product with ``centred`` again
    proj = small.mT @ u
    return proj * s.unsqueeze(0) if scale else proj


def group_weights(groups: list[list[int]], weighting: str, frequency: torch.Tensor, saliency: torch.Tensor
                  ) -> list[list[float]]:
    """Merge weights per group (each sums to 1): ``uniform``, ``frequency``, or proportional to ``saliency``
    (whichever saliency the weighting names: REAP or p²·‖f‖), unused experts lifted to the smallest positive one."""
    if weighting == "uniform":
        return [[1.0 / len(g)] * len(g) for g in groups]
    if weighting == "frequency":
        s = frequency.double()
        return [_normalise([float(s[m]) for m in g]) for g in groups]
    s = lift_zeros(saliency)
    return [_normalise([float(s[m]) for m in g]) for g in groups]


def lift_zeros(saliency: torch.Tensor) -> torch.Tensor:
    """REAM: an expert no token used still counts a little (its zero becomes the smallest positive value)."""
    s = saliency.double().clone()
    pos = s[s > 0]
    s[s <= 0] = float(pos.min()) if pos.numel() else 1.0
    return s


def _normalise(values: list[float]) -> list[float]:
    total = sum(values)
    if total <= 0 or not math.isfinite(total):
        return [1.0 / len(values)] * len(values)
    return [v / total for v in values]
