"""The layer-subset baselines a task-specific plan is compared with, all at one parameter count.

:func:`moe_slim.dense.select.all_selections` gives ProbScale (contiguous and free), ShortGPT Block
Influence, the angular distance of layer blocks (Gromov et al.), the first layers (``last-layers`` there:
it drops the last ones) and one random plan. Here: the last layers, evenly spaced layers, random plans
under several seeds, and :func:`task_selections`, every one of them under the names the reports use.
"""

from __future__ import annotations

import numpy as np

from ..errors import MoeSlimError
from .probes import ProbeMatrix
from .select import Selection, _drop_in_order, all_selections, random_selection

TASK_METHODS: tuple[str, ...] = ("probscale-contiguous", "probscale-free", "block-influence", "angular", "first-n",
                                 "last-n", "evenly-spaced")


def keep_last_selection(layer_params: dict[str, list[int]], budget: int) -> Selection:
    """Drop the first layers until the budget fits (keeps the last ones)."""
    order = [(s, i) for s, v in layer_params.items() for i in range(len(v))]
    return _drop_in_order(order, layer_params, budget, "last-n")


def evenly_spaced_selection(layer_params: dict[str, list[int]], budget: int) -> Selection:
    """Keep ``round(linspace(0, n - 1, k))`` of each stack's n layers (first and last included), with the
    largest k (the same share of every stack) whose layers fit the budget."""
    total = sum(sum(v) for v in layer_params.values())
    longest = max(len(v) for v in layer_params.values())
    for k in range(longest, 0, -1):
        keep = {s: sorted(set(np.round(np.linspace(0, len(v) - 1, max(1, round(k * len(v) / longest))))
                              .astype(int).tolist())) for s, v in layer_params.items()}
        params = sum(layer_params[s][i] for s, idx in keep.items() for i in idx)
        if params <= budget:
            return Selection("evenly-spaced", keep, params, budget, total, None, {})
    raise MoeSlimError(f"budget of {budget:,} parameters cannot keep one layer of every stack")


def task_selections(pm: ProbeMatrix, layer_params: dict[str, list[int]], budget: int, *,
                    random_seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Selection]:
    """ProbScale and every baseline at the ProbScale plan's exact parameter count (``random-<seed>`` per seed)."""
    base = all_selections(pm, layer_params, budget, seed=random_seeds[0] if random_seeds else 0)
    target = base["probscale-contiguous"].params
    out = {m: base[m] for m in ("probscale-contiguous", "probscale-free", "block-influence", "angular") if m in base}
    out["first-n"] = base["last-layers"]
    out["first-n"].method = "first-n"
    out["last-n"] = keep_last_selection(layer_params, target)
    out["evenly-spaced"] = evenly_spaced_selection(layer_params, target)
    for seed in random_seeds:
        sel = random_selection(layer_params, target, seed)
        sel.method = f"random-{seed}"
        out[sel.method] = sel
    for sel in out.values():
        sel.budget = budget
        sel.meta["equal_size"] = sel.params == target
    return out
