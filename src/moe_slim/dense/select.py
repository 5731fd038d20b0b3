"""Choosing which layers to keep under a parameter budget: ProbScale's exact DP and the baselines.

Relevance of a layer (the value a kept layer adds to the knapsack)
------------------------------------------------------------------
With ``P[l, t]`` the probe accuracy of task ``t`` after layer ``l`` (row 0 = embeddings, every row
read through the stack's final norm) and task weights ``w_t`` normalised to sum to one::

    relevance[l] = sum_t w_t * (P[l, t] - P[l-1, t])  +  eps * BI[l]

* The first term is the layer's signed *marginal gain*: how much task information a probe can read
  off the residual stream after this layer that it could not read before. It is signed so that it
  telescopes: over a kept prefix ``0..k-1`` it sums to ``P[k] - P[0]``, the score of the *last kept
  layer*, which is exactly what a probe on that slimmed model's final representation measures.
  Layers after the probe peak (late LM layers that trade task information for next-token
  prediction) get negative relevance and go first. For a prefix plus a suffix (the contiguous
  variant) the suffix is scored by the gains it made in the full model (a residual-stream
  approximation); for arbitrary subsets the same additive approximation is used.
* The second term breaks ties among layers with no measurable gain: ``BI`` is ShortGPT's Block
  Influence ``1 - cos(h_in, h_out)``; ``eps`` (1e-3) is below any probe gain on a few hundred texts.
* A layer that adds nothing (identity-like: ``h_out == h_in``) has ``P[l] == P[l-1]`` exactly (the
  same features give the same cross-validated probe on the same folds) and ``BI == 0``, so relevance
  0 (below 1e-6 counts as 0): it never adds value, so it is dropped even when the budget would
  allow keeping it.

Selection
---------
Maximise ``sum relevance`` over the kept layers subject to ``sum params <= budget``, with at
least one layer kept in every stack; ties go to the lighter subset.

* ``contiguous`` (the default plan): the *removed* layers of each stack form one contiguous block,
  so the kept layers are a prefix and a suffix. This keeps every kept layer's input close to what
  it was trained on; every block is enumerated, so it is exact. With a pure prefix the objective is
  exact, not an approximation.
* ``free``: any subset; a 0/1 knapsack solved exactly by dynamic programming over Pareto-optimal
  (params, value) states (exact for any integer layer sizes, small because layers come in few
  sizes). It trusts the additive approximation fully; on pretrained LMs, where later layers depend
  on early ones, that is optimistic (see the benchmark).

Stacks (T5's encoder and decoder) are combined exactly. Baselines at the same budget: ShortGPT
Block Influence (drop the lowest-BI layers until the budget fits), dropping the last layers, and
dropping random layers (seeded).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MoeSlimError
from .probes import ProbeMatrix

RELEVANCE_EPS = 1e-3
IDENTITY_TOL = 1e-6
NOISE_Z = 1.96  # probe gains within this many standard errors of zero count as zero
SELECTIONS: tuple[str, ...] = ("contiguous", "free")
METHODS: tuple[str, ...] = ("probscale-contiguous", "probscale-free", "block-influence", "angular", "last-layers",
                             "random")
BASELINES: tuple[str, ...] = ("block-influence", "angular", "last-layers", "random")

State = tuple[int, float, tuple[int, ...]]  # (params, value, kept indices)


# --------------------------------------------------------------------------------------------
# budgets


def parse_budget(spec: str | float | int, layer_params: dict[str, list[int]]) -> int:
    """A budget on transformer-layer parameters, from a spec, as a parameter count.

    ``0.33`` or ``33%``: that fraction of all layer parameters; ``x3``: three times fewer;
    ``12M`` / ``1.5e7`` / ``12000000``: an absolute count of layer parameters; ``10L``: the size of
    that many (average-sized) layers.
    """
    total = sum(sum(v) for v in layer_params.values())
    n_layers = sum(len(v) for v in layer_params.values())
    s = str(spec).strip().lower().replace("_", "")
    try:
        if s.endswith("%"):
            value = total * float(s[:-1]) / 100.0
        elif s.startswith("x") or s.endswith("x"):
            factor = float(s.strip("x"))
            if factor <= 0:
                raise ValueError
            value = total / factor
        elif s.endswith("l") or s.endswith("layers"):
            value = float(re.sub(r"(layers|l)$", "", s)) * total / n_layers
        elif s[-1:] in "kmb" and s[:-1]:
            value = float(s[:-1]) * {"k": 1e3, "m": 1e6, "b": 1e9}[s[-1]]
        else:
            v = float(s)
            value = total * v if 0 < v <= 1 else v
    except ValueError:
        raise MoeSlimError(f"budget {spec!r} is not understood; give a fraction (0.33), a percentage (33%), "
                           "a reduction (x3), a layer count (10L) or a parameter count (12M)") from None
    if not math.isfinite(value) or value <= 0:
        raise MoeSlimError(f"budget {spec!r} must be positive")
    budget = int(math.floor(value + 1e-6))
    minimum = sum(min(v) for v in layer_params.values())
    if budget < minimum:
        smallest = min(min(v) for v in layer_params.values())
        raise MoeSlimError(
            f"budget {spec!r} ({budget:,} parameters) is below one layer per stack ({minimum:,}; the smallest layer "
            f"has {smallest:,}); give at least {minimum / total:.3f} of the {total:,} layer parameters")
    if budget >= total:
        raise MoeSlimError(f"budget {spec!r} ({budget:,} parameters) keeps every layer ({total:,} layer parameters); "
                           "give less, e.g. x2 or 0.5")
    return budget


def round_up_budget(params: float, layer_params: dict[str, list[int]]) -> int:
    """The smallest budget >= ``params`` that holds any ``n`` layers, where ``n`` layers of average size
    make ``params``: so a predicted 1.2 layers becomes 2 whole layers rather than 1."""
    sizes = sorted((x for v in layer_params.values() for x in v), reverse=True)
    mean = sum(sizes) / len(sizes)
    n = min(len(sizes), max(1, math.ceil(params / mean - 1e-9)))
    return int(max(math.ceil(params), sum(sizes[:n]), sum(min(v) for v in layer_params.values())))


# --------------------------------------------------------------------------------------------
# relevance


def _metric_table(pm: ProbeMatrix, metric: str) -> dict[str, np.ndarray]:
    table = {"accuracy": pm.accuracy, "skill": pm.skill}.get(metric)
    if table is None:
        raise MoeSlimError(f"unknown relevance metric {metric!r}; choose accuracy or skill")
    return table


def gain_noise(pm: ProbeMatrix, stack: str, metric: str = "accuracy") -> np.ndarray:
    """Standard error of each layer's weighted probe gain ``sum_t w_t (P[l,t] - P[l-1,t])``.

    Each task's accuracy is a mean over its ``n_t`` cross-validated examples; the difference of two
    layers' accuracies on the same examples has variance at most about ``2 p(1-p) / n_t`` (the two
    probes treated as independent; they agree on most examples, so this errs on the side of calling
    a gain noise). Skill divides accuracy above chance by ``1 - chance``, and so its error. Zero
    where the matrix does not record the example counts (matrices saved before it did)."""
    P = pm.accuracy[stack]
    n = np.array([float(pm.meta.get("examples", {}).get(t, 0)) for t in pm.tasks])
    if not (n > 0).all() or P.shape[0] < 2:
        return np.zeros(max(P.shape[0] - 1, 0))
    pbar = np.clip((P[1:] + P[:-1]) / 2, 0.0, 1.0)
    var = 2 * pbar * (1 - pbar) / n
    if metric == "skill":
        var = var / np.array([max(1.0 - pm.chance.get(t, 0.0), 1e-9) for t in pm.tasks]) ** 2
    return np.sqrt(var @ pm.norm_weights() ** 2)


def layer_relevance(pm: ProbeMatrix, *, metric: str = "accuracy", eps: float = RELEVANCE_EPS,
                    z: float = NOISE_Z) -> dict[str, np.ndarray]:
    """``relevance[stack][l]`` for every layer (see the module docstring). A gain within ``z`` standard
    errors of zero (:func:`gain_noise`) counts as zero: the probes cannot tell that layer's worth, and
    Block Influence decides among such layers (``z=0`` trusts every gain)."""
    table = _metric_table(pm, metric)
    w = pm.norm_weights()
    out = {}
    for stack, P in table.items():
        gain = np.diff(P, axis=0) @ w
        if z > 0:
            gain = np.where(np.abs(gain) <= z * gain_noise(pm, stack, metric), 0.0, gain)
        bi = np.asarray(pm.block_influence.get(stack, np.zeros(len(gain))), float)
        rel = gain + eps * np.clip(bi, 0.0, None)
        rel[np.abs(rel) < IDENTITY_TOL] = 0.0  # float noise of an identity layer (cos of equal vectors: 1 +- 1e-7)
        out[stack] = rel
    return out


def significant_gains(pm: ProbeMatrix, *, metric: str = "accuracy", z: float = NOISE_Z) -> dict[str, int]:
    """Per stack, how many layers' probe gains are beyond ``z`` standard errors of zero."""
    table = _metric_table(pm, metric)
    return {s: int((np.abs(np.diff(P, axis=0) @ pm.norm_weights()) > z * gain_noise(pm, s, metric)).sum())
            for s, P in table.items()}


# --------------------------------------------------------------------------------------------
# exact selection


def _prune(states: list[State]) -> list[State]:
    """Pareto frontier: lighter is better, higher value is better (ties keep the first seen)."""
    states = sorted(states, key=lambda s: (s[0], -s[1]))
    out: list[State] = []
    best = -math.inf
    for s in states:
        if s[1] > best:
            out.append(s)
            best = s[1]
    return out


def knapsack_frontier(weights: list[int], values: list[float], capacity: int, min_keep: int = 1) -> list[State]:
    """All Pareto-optimal non-empty subsets (params <= capacity), exact."""
    if min_keep != 1:
        raise ValueError("only min_keep=1 is supported")
    nonempty: list[State] = []
    for i, (wi, vi) in enumerate(zip(weights, values)):
        new = [(w + wi, v + vi, keep + (i,)) for (w, v, keep) in nonempty if w + wi <= capacity]
        if wi <= capacity:
            new.append((wi, vi, (i,)))
        nonempty = _prune(nonempty + new)
    return nonempty


def contiguous_frontier(weights: list[int], values: list[float], capacity: int) -> list[State]:
    """Pareto-optimal subsets whose removed layers form one contiguous block (or none), exact."""
    n = len(weights)
    pw = np.concatenate([[0], np.cumsum(weights)])
    pv = np.concatenate([[0.0], np.cumsum(values)])
    states: list[State] = []
    for i in range(n + 1):
        for j in range(i, n + 1):
            if j - i >= n:
                continue  # at least one layer stays
            w = int(pw[n] - (pw[j] - pw[i]))
            if w > capacity:
                continue
            v = float(pv[n] - (pv[j] - pv[i]))
            states.append((w, v, tuple(range(i)) + tuple(range(j, n))))
    return _prune(states)


def _combine(frontiers: list[list[State]], capacity: int) -> list[tuple[int, float, list[tuple[int, ...]]]]:
    combos: list[tuple[int, float, list[tuple[int, ...]]]] = [(0, 0.0, [])]
    for fr in frontiers:
        merged = [(w + fw, v + fv, keeps + [fk]) for (w, v, keeps) in combos for (fw, fv, fk) in fr if w + fw <= capacity]
        merged.sort(key=lambda s: (s[0], -s[1]))
        combos, best = [], -math.inf
        for s in merged:
            if s[1] > best:
                combos.append(s)
                best = s[1]
    return combos


def exact_states(weights: list[int], values: list[float], capacity: int, contiguous: bool,
                 block_value: Any = None) -> dict[int, tuple[float, tuple[int, ...]]]:
    """For every achievable kept-parameter count ``<= capacity``: the best (value, kept layers) with exactly
    that count (at least one layer kept). ``block_value(i, j)`` replaces the value of a contiguous plan
    that drops layers ``i..j-1`` (the angular baseline)."""
    n = len(weights)
    best: dict[int, tuple[float, tuple[int, ...]]] = {}

    def offer(w: int, v: float, keep: tuple[int, ...]) -> None:
        if w <= capacity and (w not in best or v > best[w][0] + 1e-12):
            best[w] = (v, keep)

    if contiguous:
        pw = np.concatenate([[0], np.cumsum(weights)])
        pv = np.concatenate([[0.0], np.cumsum(values)]) if block_value is None else None
        for i in range(n + 1):
            for j in range(i, n + 1):
                if j - i >= n:
                    continue
                w = int(pw[n] - (pw[j] - pw[i]))
                v = float(pv[n] - (pv[j] - pv[i])) if block_value is None else float(block_value(i, j))
                offer(w, v, tuple(range(i)) + tuple(range(j, n)))
        return best
    states: dict[int, tuple[float, tuple[int, ...]]] = {}
    for i, (wi, vi) in enumerate(zip(weights, values)):
        new = dict(states)
        cands = [(w + wi, v + vi, k + (i,)) for w, (v, k) in states.items()] + [(wi, vi, (i,))]
        for w, v, k in cands:
            if w <= capacity and (w not in new or v > new[w][0] + 1e-12):
                new[w] = (v, k)
        states = new
    for w, (v, k) in states.items():
        offer(w, v, k)
    return best


def _combine_exact(per_stack: list[dict[int, tuple[float, tuple[int, ...]]]], capacity: int
                   ) -> dict[int, tuple[float, list[tuple[int, ...]]]]:
    combos: dict[int, tuple[float, list[tuple[int, ...]]]] = {0: (0.0, [])}
    for st in per_stack:
        new: dict[int, tuple[float, list[tuple[int, ...]]]] = {}
        for w, (v, keeps) in combos.items():
            for fw, (fv, fk) in st.items():
                tw, tv = w + fw, v + fv
                if tw <= capacity and (tw not in new or tv > new[tw][0] + 1e-12):
                    new[tw] = (tv, keeps + [fk])
        combos = new
    return combos


def select_filled(values: dict[str, np.ndarray], layer_params: dict[str, list[int]], budget: int, *,
                  contiguous: bool, method: str, block_values: dict[str, Any] | None = None) -> Selection:
    """The nearest achievable plan: the largest kept-parameter count ``<= budget``, and among the plans of
    exactly that size the one of highest value (so ``x3`` is never a 4x plan, and every method compared at
    a budget keeps the same number of parameters where the layer sizes allow it)."""
    stacks = list(layer_params)
    total = sum(sum(v) for v in layer_params.values())
    per = []
    for s in stacks:
        w = [int(x) for x in layer_params[s]]
        v = [float(x) for x in values[s]] if values is not None else [0.0] * len(w)
        if len(w) != len(v):
            raise MoeSlimError(f"stack {s}: {len(v)} relevances for {len(w)} layers (probe matrix of another model?)")
        bv = (block_values or {}).get(s)
        per.append(exact_states(w, v, budget, contiguous, bv))
    combos = _combine_exact(per, budget)
    if not combos or max(combos) == 0:
        raise MoeSlimError(f"budget of {budget:,} parameters cannot keep one layer of every stack")
    w = max(combos)
    v, keeps = combos[w]
    return Selection(method, {s: list(k) for s, k in zip(stacks, keeps)}, int(w), budget, total, float(v))


@dataclass
class Selection:
    """Which layers of each stack to keep, and what that costs."""

    method: str
    keep: dict[str, list[int]]
    params: int
    budget: int
    total: int
    value: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.params / self.total

    def drop(self, sizes: dict[str, int]) -> dict[str, list[int]]:
        return {k: [i for i in range(sizes[k]) if i not in set(v)] for k, v in self.keep.items()}

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "keep": self.keep, "retained_layer_params": self.params,
                "budget_params": self.budget, "total_layer_params": self.total,
                "retained_fraction": round(self.fraction, 6), "reduction": round(self.total / self.params, 4),
                "objective": self.value, **self.meta}


def select_layers(relevance: dict[str, np.ndarray], layer_params: dict[str, list[int]], budget: int, *,
                  contiguous: bool = False) -> Selection:
    """The exact maximum-relevance layer subset within ``budget`` parameters."""
    stacks = list(layer_params)
    total = sum(sum(v) for v in layer_params.values())
    frontiers = []
    for s in stacks:
        w = [int(x) for x in layer_params[s]]
        v = [float(x) for x in relevance[s]]
        if len(w) != len(v):
            raise MoeSlimError(f"stack {s}: {len(v)} relevances for {len(w)} layers (probe matrix of another model?)")
        fr = contiguous_frontier(w, v, budget) if contiguous else knapsack_frontier(w, v, budget)
        if not fr:
            raise MoeSlimError(f"budget of {budget:,} parameters cannot keep one layer of stack {s}")
        frontiers.append(fr)
    combos = _combine(frontiers, budget)
    if not combos:
        raise MoeSlimError(f"budget of {budget:,} parameters cannot keep one layer of every stack")
    w, v, keeps = max(combos, key=lambda s: (s[1], -s[0]))
    return Selection("probscale-contiguous" if contiguous else "probscale-free",
                     {s: list(k) for s, k in zip(stacks, keeps)}, int(w), budget, total, float(v))


# --------------------------------------------------------------------------------------------
# baselines


def _drop_in_order(order: list[tuple[str, int]], layer_params: dict[str, list[int]], budget: int, method: str,
                   **meta: Any) -> Selection:
    keep = {s: set(range(len(v))) for s, v in layer_params.items()}
    params = sum(sum(v) for v in layer_params.values())
    total = params
    for s, i in order:
        if params <= budget:
            break
        if len(keep[s]) <= 1 or i not in keep[s]:
            continue
        keep[s].discard(i)
        params -= layer_params[s][i]
    if params > budget:
        raise MoeSlimError(f"budget of {budget:,} parameters cannot keep one layer of every stack")
    return Selection(method, {s: sorted(k) for s, k in keep.items()}, params, budget, total, None, dict(meta))


def block_influence_selection(block_influence: dict[str, np.ndarray], layer_params: dict[str, list[int]],
                              budget: int) -> Selection:
    """ShortGPT: drop layers in increasing Block Influence until the budget fits."""
    order = sorted(((s, i) for s, bi in block_influence.items() for i in range(len(bi))),
                   key=lambda si: (float(block_influence[si[0]][si[1]]), si[0], si[1]))
    return _drop_in_order(order, layer_params, budget, "block-influence")


def last_layers_selection(layer_params: dict[str, list[int]], budget: int) -> Selection:
    """Drop the last layers (of the stack with most layers left, for encoder-decoders)."""
    left = {s: len(v) for s, v in layer_params.items()}
    order = []
    for _ in range(sum(left.values())):
        s = max(reversed(list(left)), key=lambda k: left[k])
        order.append((s, left[s] - 1))
        left[s] -= 1
    return _drop_in_order(order, layer_params, budget, "last-layers")


def random_selection(layer_params: dict[str, list[int]], budget: int, seed: int = 0) -> Selection:
    """Drop random layers (seeded) until the budget fits."""
    order = [(s, i) for s, v in layer_params.items() for i in range(len(v))]
    random.Random(seed).shuffle(order)
    return _drop_in_order(order, layer_params, budget, "random", seed=seed)


def angular_selection(angular: dict[str, np.ndarray], layer_params: dict[str, list[int]], budget: int) -> Selection:
    """Gromov et al. (2024): drop the block of consecutive layers ``i..j-1`` whose input and output are
    closest in angular distance ``D[i, j] = arccos(cos(h_i, h_j)) / pi`` (``angular[stack]`` is that
    (L+1)x(L+1) matrix over the rows of the residual stream), the largest block that fits the budget."""
    missing = [s for s in layer_params if s not in angular]
    if missing:
        raise MoeSlimError(f"no angular distances for stack {missing[0]} (extract features with the full model first)")
    bv = {s: (lambda i, j, D=np.asarray(angular[s], float): 0.0 if i == j else -float(D[i, j])) for s in layer_params}
    sel = select_filled({s: np.zeros(len(v)) for s, v in layer_params.items()}, layer_params, budget,
                        contiguous=True, method="angular", block_values=bv)
    sel.meta["angular_distance"] = -float(sel.value or 0.0)
    sel.value = None
    return sel


def all_selections(pm: ProbeMatrix, layer_params: dict[str, list[int]], budget: int, *, seed: int = 0,
                   metric: str = "accuracy") -> dict[str, Selection]:
    """ProbScale (contiguous and free) and the baselines, all at equal size.

    ProbScale's contiguous plan is the nearest achievable plan to ``budget`` (the largest kept-parameter
    count that fits, see :func:`select_filled`); every other method is then held to exactly the parameter
    count that plan keeps. ``meta["equal_size"]`` says whether a method's plan matches it exactly (layers
    of unequal sizes can make that impossible).
    """
    rel = layer_relevance(pm, metric=metric)
    primary = select_filled(rel, layer_params, budget, contiguous=True, method="probscale-contiguous")
    target = primary.params
    out = {
        "probscale-contiguous": primary,
        "probscale-free": select_filled(rel, layer_params, target, contiguous=False, method="probscale-free"),
        "block-influence": block_influence_selection(pm.block_influence, layer_params, target),
        "last-layers": last_layers_selection(layer_params, target),
        "random": random_selection(layer_params, target, seed),
    }
    if pm.angular:
        out["angular"] = angular_selection(pm.angular, layer_params, target)
    for sel in out.values():
        sel.budget = budget
        sel.meta.setdefault("relevance_sum", float(sum(rel[s][i] for s, k in sel.keep.items() for i in k)))
        sel.meta["equal_size"] = sel.params == target
    return {m: out[m] for m in METHODS if m in out}
