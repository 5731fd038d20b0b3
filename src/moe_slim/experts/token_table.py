"""Token-routed (hash) layers: where a removed expert's tokens go.

DeepSeek-V4's first MoE layers pick experts by a fixed table (``gate.tid2eid[token id] -> top_k
expert ids``), not by the router's logits; the router only weights the chosen experts. Removing an
expert strands every token id that the table sends to it, so the table is rewritten: each entry
that names a removed expert names a kept one instead (its *target*), and every entry is renumbered
to the kept order. The layer then keeps the same count as any other layer.

Targets of a prune plan are chosen when the plan is made (they need the statistics) and written in
the plan (``LayerPlan.remap``, removed -> kept, in original numbers), so a person can read and
edit them and applying needs no statistics. The rule: the kept expert whose mean output over the
calibration tokens routed to it (``out_sum / count``) is closest in cosine to the removed expert's
mean output; the substitute pushes the residual stream the same way, as a MoNE novice would. Where
either mean is unobserved (an expert the calibration text never reached, or statistics written
before output sums), the kept expert with the best plan score. A merge plan needs no targets: a
member's entries go to its group's merged expert. Two entries of one row may then name the same
expert; the experts module runs it once per entry, so that token's weight for it is the sum.
"""

from __future__ import annotations

import torch

from .plan import ExpertPlan, LayerPlan
from .stats import DomainStats


def resolve_remap(lp: LayerPlan, n_experts: int) -> dict[int, int]:
    """Every removed expert of the layer -> its kept target: the plan's ``remap``, and for an expert the
    plan names no target for, the kept expert with the best plan score (the first kept without scores)."""
    kept = set(lp.keep)
    scored = sorted(lp.keep, key=lambda e: (-lp.scores[e], e)) if len(lp.scores) == n_experts else list(lp.keep)
    return {e: int(lp.remap.get(e, scored[0])) for e in range(n_experts) if e not in kept}


def remapped_table(table: torch.Tensor, keep: list[int], remap: dict[int, int], renumber: bool = True) -> torch.Tensor:
    """``table`` (expert ids) with each removed expert replaced by its target and, with ``renumber``, every id
    replaced by its position in ``keep``; in the table's own dtype (tid2eid is int64 in memory, int32 on disk
    in DeepSeek's release)."""
    n = max(max(keep), *remap, int(table.max()) if table.numel() else 0) + 1
    lookup = torch.arange(n, dtype=torch.long)
    for e, t in remap.items():
        lookup[e] = t
    if renumber:
        position = torch.full((n,), -1, dtype=torch.long)
        position[torch.tensor(keep, dtype=torch.long)] = torch.arange(len(keep))
        lookup = position[lookup]
    out = lookup[table.long().cpu()]
    if bool((out < 0).any()):
        raise ValueError("the token table names an expert that is neither kept nor remapped")
    return out.to(table.dtype).to(table.device)


def nearest_kept(means: torch.Tensor, counts: torch.Tensor, lp: LayerPlan) -> dict[int, int]:
    """The plan rule: each removed expert -> the kept expert with the most similar mean output (cosine), for
    the experts whose mean output was observed (``means`` ``[E, hidden]``, ``counts`` ``[E]`` of one layer)."""
    kept = torch.tensor(lp.keep, dtype=torch.long)
    seen = counts > 0
    unit = torch.nn.functional.normalize(means.double(), dim=-1)
    out: dict[int, int] = {}
    for e in range(means.shape[0]):
        if e in lp.keep or not bool(seen[e]) or not bool(seen[kept].any()):
            continue
        sim = torch.where(seen[kept], unit[kept] @ unit[e], torch.full((len(kept),), -2.0, dtype=torch.float64))
        out[e] = int(kept[int(torch.argmax(sim))])  # ties: the first (lowest) kept expert
    return out


def merge_remap(groups: list[list[int]]) -> dict[int, int]:
    """A merge plan's targets: every member -> its group's representative (whose slot the merged expert takes)."""
    return {m: g[0] for g in groups for m in g[1:]}


def add_remaps(plan: ExpertPlan, observed: DomainStats, layers: list[int]) -> None:
    """Write the plan rule's targets (:func:`nearest_kept`, then the best-scored kept expert) into the plan's
    token-routed ``layers`` (indices into ``plan.layers`` and the statistics)."""
    means = observed.out_sum if "out_sum" in observed.tensors else None
    for li in layers:
        lp = plan.layers[li]
        near = nearest_kept(means[li], observed.count[li], lp) if means is not None else {}
        lp.remap = {**resolve_remap(lp, plan.num_experts), **near}
