"""Expert saliency criteria: statistics -> ``scores[layer, expert]`` (higher = keep).

Every criterion is computed from the saved sufficient statistics alone, so any of them can be
re-scored on any calibration mix without running the model again.

* ``frequency``: share of tokens that select the expert.
* ``gate``: soft gate mass, the mean of the router's normalised score over all tokens.
* ``weighted_frequency``: mean routing weight the expert receives (0 when not selected).
* ``ean``: expert activation norm, sum of ||output|| over routed tokens, per token seen.
* ``reap``: REAP as its repository defines it since 2026-03-11 (CerebrasResearch/reap
  ``pruning_metrics.update_pruning_state`` with ``renormalize_router_weights=True``): the mean, over
  the tokens routed to the expert, of weight * ||output||, each token's top-k weights renormalised to
  sum to 1. REAP takes the weights from a softmax of the logits; here they are the model's own routing
  weights, which is the same for softmax routers (ours: a sigmoid router, DeepSeek-V3, is renormalised
  from its sigmoid scores). Statistics gathered before the renormalised sum was recorded fall back to
  ``reap_weights`` with a note.
* ``reap_weights``: the mean over routed tokens of the model's own routing weight * ||output|| (moe_slim's
  ``reap`` before issue 31). It equals ``reap`` on routers that renormalise top-k (``norm_topk_prob``,
  Mixtral, GPT-OSS, the reference model) and REAP's definition before 2026-03-11 on softmax routers that
  do not (OLMoE, Qwen2-MoE).
* ``task_contrast``: saliency on a target mix times the share of that saliency owed to the
  target rather than a reference mix (experts a task does not need score low).
* ``mone``: MoNE (Mixture of Novices and Experts, ICLR 2026; its code's ``fusion`` metric): mean routing
  weight per token times the spread of the expert's output around its mean, sqrt(E||f - mean f||^2)
  over the tokens routed to it. An expert that is rarely weighted or nearly constant scores low, and
  :mod:`moe_slim.experts.mone` replaces it by that mean ("novice"). Needs the output sums.
* ``random``: a seeded baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import MoeSlimError
from ..outputs import note
from .stats import DomainStats, RouterStats


def _per_token(s: DomainStats, field: str) -> torch.Tensor:
    return s.tensors[field] / s.tokens.clamp_min(1).unsqueeze(1)


def frequency(s: DomainStats) -> torch.Tensor:
    return _per_token(s, "count")


def gate(s: DomainStats) -> torch.Tensor:
    return _per_token(s, "soft_sum")


def weighted_frequency(s: DomainStats) -> torch.Tensor:
    return _per_token(s, "weight_sum")


def ean(s: DomainStats) -> torch.Tensor:
    return _per_token(s, "norm_sum")


def reap(s: DomainStats) -> torch.Tensor:
    if "rwnorm_sum" not in s.tensors:
        note("these statistics predate REAP's renormalised saliency: reap is scored with the model's own routing "
             "weights (reap_weights; the same on routers that renormalise top-k); observe again for the current REAP")
        return reap_weights(s)
    return s.rwnorm_sum / s.count.clamp_min(1)


def reap_weights(s: DomainStats) -> torch.Tensor:
    return s.wnorm_sum / s.count.clamp_min(1)


def reap_mass(s: DomainStats) -> torch.Tensor:
    """Weighted-norm mass per token: REAP times frequency (the default base of task contrast)."""
    return _per_token(s, "wnorm_sum")


def novice_means(s: DomainStats) -> torch.Tensor:
    """``[layer, expert, hidden]``: each expert's mean (unweighted) output over the tokens routed to it."""
    if "out_sum" not in s.tensors:
        raise MoeSlimError("these statistics lack the experts' output sums that MoNE needs (they were gathered "
                           "before moe_slim recorded them); run observe again")
    return s.out_sum / s.count.clamp_min(1).unsqueeze(-1)


def mone(s: DomainStats) -> torch.Tensor:
    mean = novice_means(s)
    spread = (s.out_sq_sum / s.count.clamp_min(1) - mean.pow(2).sum(-1)).clamp_min(0).sqrt()
    return weighted_frequency(s) * spread


CRITERIA: dict[str, Callable[[DomainStats], torch.Tensor]] = {
    "frequency": frequency,
    "gate": gate,
    "weighted_frequency": weighted_frequency,
    "ean": ean,
    "reap": reap,
    "reap_weights": reap_weights,
    "reap_mass": reap_mass,
    "mone": mone,
}
ALL_CRITERIA: tuple[str, ...] = (*CRITERIA, "task_contrast", "random")


def task_contrast(target: DomainStats, reference: DomainStats, base: str = "reap_mass", alpha: float = 1.0) -> torch.Tensor:
    """``share_t * (share_t / (share_t + share_r)) ** alpha`` with per-layer saliency shares.

    An expert only the target uses keeps its full target share; one used equally by both keeps
    half of it (alpha=1); one the target never uses scores 0. alpha=0 is plain target saliency.
    """
    fn = CRITERIA[base]
    st, sr = fn(target), fn(reference)
    share_t = st / st.sum(1, keepdim=True).clamp_min(1e-30)
    share_r = sr / sr.sum(1, keepdim=True).clamp_min(1e-30)
    specificity = share_t / (share_t + share_r).clamp_min(1e-30)
    return share_t * specificity.pow(alpha)


def random_scores(n_layers: int, n_experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_layers, n_experts, generator=g, dtype=torch.float64)


def score(
    stats: RouterStats,
    criterion: str,
    *,
    mix: dict[str, float] | None = None,
    reference: dict[str, float] | None = None,
    seed: int = 0,
    base: str = "reap_mass",
) -> torch.Tensor:
    """Scores ``[layer, expert]`` of ``criterion`` on the calibration ``mix`` of ``stats``.

    ``task_contrast`` contrasts ``mix`` (the target) with ``reference`` (default: every domain
    the target does not use, or all domains if it uses them all).
    """
    if criterion not in ALL_CRITERIA:
        raise MoeSlimError(f"unknown criterion '{criterion}' (choose from: {', '.join(ALL_CRITERIA)})")
    if criterion == "random":
        return random_scores(stats.n_layers, stats.n_experts, seed)
    target = stats.mix(mix)
    if criterion == "task_contrast":
        if mix is None:
            raise MoeSlimError("task_contrast needs a target mix (e.g. --mix translation=1)")
        if base not in CRITERIA:
            raise MoeSlimError(f"unknown base criterion '{base}' for task_contrast (choose from: {', '.join(CRITERIA)})")
        if reference is None:
            others = [d for d in stats.domains if mix.get(d, 0) <= 0]
            reference = {d: 1.0 for d in (others or stats.domains)}
        if {d for d, w in reference.items() if w > 0} == {d for d, w in mix.items() if w > 0}:
            note(f"task_contrast: the reference ({', '.join(sorted(reference))}) is the target itself, so nothing is "
                 "contrasted and experts rank by plain saliency (reap_mass); give a --reference of other domains or "
                 "a target that leaves some observed domain out")
        return task_contrast(target, stats.mix(reference), base=base)
    return CRITERIA[criterion](target)
