"""Merge a model's experts, layer by layer: features on the token sample, groups, alignment, averaging.

The whole recipe of a method (grouping, alignment, weights, router row) is data in
:mod:`.methods`. Which tensor axis of each expert parameter holds the intermediate neurons comes
from the family table (:attr:`~moe_slim.families.Family.expert_neurons`); nothing here knows a model
class. ``sequential=True`` re-gathers each layer's sample through the already merged layers before
merging it (REAM's sequential mode); it needs the calibration text. The decisions are returned as a
:class:`~.plan.MergePlan`, which :func:`~.apply.apply_merge_plan` replays without statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import MoeSlimError
from ...families import (
    check_uniform,
    family_of,
    moe_layers,
    set_config_counts,
)
from ...modeling.dispatch import prepare_model
from ..batches import make_batches
from ..criteria import score
from ..plan import check_ratio
from ..stats import RouterStats
from .align import align as hungarian
from .align import ream_cost, weight_matching_cost
from .apply import merge_layer
from .features import InMemoryLayers, layer_features
from .grouping import (
    _within_router_groups,
    group_hc,
    group_msmoe,
    group_ream,
    ream_similarity,
)
from .methods import (
    DEFAULT_ALIGN_TOKENS,
    DEFAULT_SAMPLE_TOKENS,
    _check_request,
    method_spec,
    samples_hint,
)
from ..superexperts import super_experts
from .options import (
    ALIGNS,
    ROUTER_ROWS,
    WEIGHTINGS,
    align_rows,
    check_choice,
    default_group_size,
    default_router_row,
    group_weights,
    order_groups,
    pca_rows,
    warn_group_size,
)
from .plan import PERMUTATIONS_FILE, MergeLayerPlan, MergePlan, _sha
from .runner import ExpertRunner
from .tensors import weight_features


@torch.no_grad()
def merge_model(
    model: nn.Module,
    stats: RouterStats | None,
    method: str = "ream",
    ratio: float = 0.5,
    *,
    mix: dict[str, float] | None = None,
    group_size: int | None = None,
    max_tokens: int = DEFAULT_SAMPLE_TOKENS,
    align_tokens: int = DEFAULT_ALIGN_TOKENS,
    grouping: str | None = None,
    sequential: bool = False,
    calibration: dict[str, list[str]] | None = None,
    tokenizer: Any = None,
    seq_len: int = 512,
    batch_size: int = 8,
    pack: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    router_row: str | None = None,
    tied: bool = False,
    align: str | None = None,
    weighting: str | None = None,
    pca_dims: int = 64,
    dominants: str = "frequency",
    global_dominants: bool = False,
    protect_super: bool = False,
    access: InMemoryLayers | None = None,
) -> MergePlan:
    """Merge the experts of ``model`` in place to ``round(E * (1 - ratio))`` per layer; return the plan.

    ``stats`` must hold token samples (``observe(..., samples=N)``) unless ``sequential``, which
    re-gathers each layer's sample from ``calibration`` texts (with ``tokenizer``) through the
    already merged layers and scores saliency (REAP) and frequency on that sample (``mix=None``:
    equal shares of the domains). ``mix`` weights the calibration domains (saliency, frequency and the
    sample); ``max_tokens`` bounds the sample per layer; ``align_tokens`` the tokens whose
    activations align neurons (REAM), drawn at random from the whole sample; ``group_size`` is REAM's C
    (None: :func:`~.options.default_group_size`). ``grouping`` overrides the method's grouping
    (``ream``, ``hc``, ``msmoe``), ``align`` its alignment (``ream``, ``weights``, ``none``) and
    ``weighting`` its merge weights (``saliency`` = REAP, ``ream-repo`` = p²·‖f‖ as REAM's repository,
    ``frequency``, ``uniform``). ``pca_dims``: REAM alignment compares neurons' weight vectors after PCA
    to that many dimensions (0: off). ``router_row``: whose router row a merged expert keeps
    (``frequency``, ``saliency``, ``method``; see :mod:`.options`). ``tied``: the papers' merge (every
    member bound to the merged weights, router untouched, no shrink). ``dominants``: M-SMoE's dominant
    experts by ``frequency`` (the paper) or ``saliency`` (REAP); ``global_dominants`` ranks them across
    layers (as M-SMoE does; needs ``tied``, since layers then keep different counts). ``protect_super``:
    super-experts (:mod:`moe_slim.experts.superexperts`, from saved statistics) stay groups of their own.
    ``access`` reaches each layer's weights and sequential sample (default: the model is in memory;
    :mod:`.at_size` reads one layer at a time).
    """
    say = log or (lambda msg: None)
    access = access or InMemoryLayers()
    spec = method_spec(method, grouping)
    check_choice("router row", router_row, ROUTER_ROWS)
    check_choice("alignment", align, ALIGNS)
    check_choice("merge weighting", weighting, WEIGHTINGS)
    check_choice("dominants rule", dominants, ("frequency", "saliency"))
    spec = type(spec)(spec.grouping, align or spec.align, weighting or spec.weighting, spec.router)
    router_row = router_row or default_router_row(spec.grouping)
    if global_dominants and not (tied and spec.grouping == "msmoe"):
        raise MoeSlimError("global dominants give each layer its own expert count, which only a tied M-SMoE merge "
                           "keeps loadable (use method m-smoe with tied)")
    check_ratio(ratio)
    if max_tokens < 1 or align_tokens < 1:
        raise MoeSlimError("max_tokens and align_tokens must be positive token counts")
    prepare_model(model)
    family = family_of(model)
    layers = moe_layers(model)
    E = check_uniform(layers)
    k = int(round(E * (1.0 - ratio)))
    groups_cfg = family.groups(model.config)
    n_group = groups_cfg[0] if groups_cfg else 1
    if group_size is None:
        group_size = default_group_size(E, k, n_group)
    _check_request(family, model.config, E, k, spec, group_size)
    if spec.grouping == "ream":
        warn_group_size(group_size, E)
    if sequential:
        if not calibration or tokenizer is None:
            raise MoeSlimError("sequential merging re-runs the calibration text through the merged layers; "
                               "give the calibration text (--calib) and a tokenizer")
    elif stats is None or stats.samples is None:
        raise MoeSlimError("merging needs token samples (layer inputs, router logits) that these statistics lack; "
                           + samples_hint(str(getattr(model.config, "_name_or_path", "") or "MODEL")))
    if stats is not None:
        stats.check_model(model)
    if mix is not None and stats is not None:
        stats._check_domains(mix)
    if global_dominants and (sequential or n_group > 1):
        raise MoeSlimError("global dominants need saved statistics and a router without expert groups")
    started = time.perf_counter()

    sal_all = freq_all = None
    batches: dict[str, list[Any]] = {}
    cap = 0
    if sequential:
        weights = mix or {d: 1.0 for d in calibration}
        missing = [d for d in weights if d not in calibration]
        if missing:
            raise MoeSlimError(f"the calibration text has no domain {', '.join(missing)} (it has: {', '.join(calibration)})")
        total_w = sum(w for w in weights.values() if w > 0)
        for d, w in weights.items():
            if w <= 0:
                continue
            cap_d = max(1, int(max_tokens * w / total_w))
            batches[d] = make_batches(tokenizer, calibration[d], seq_len=seq_len, batch_size=batch_size,
                                      max_tokens=cap_d, pack=pack)
            if not batches[d]:
                raise MoeSlimError(f"calibration domain '{d}' has no text")
            cap = max(cap, cap_d)
    else:
        sal_all = score(stats, "reap", mix=mix)
        freq_all = score(stats, "frequency", mix=mix)
    supers = None
    if protect_super:
        if stats is None:
            raise MoeSlimError("protecting super-experts needs saved statistics (their largest output norms)")
        supers = super_experts(stats, mix)
    k_layers = [k] * len(layers)
    if global_dominants:
        k_layers = _global_counts(freq_all if dominants == "frequency" else sal_all, k)

    plan_layers: list[MergeLayerPlan] = []
    permutations: dict[int, torch.Tensor] = {}
    sample_tokens: list[int] = []
    for li, layer in enumerate(layers):
        t0 = time.perf_counter()
        layer = access.open(li, layer)
        if sequential:
            sample = access.gather(model, layer, batches, cap).take(li, mix, max_tokens, seed)
        else:
            sample = stats.samples.take(li, mix, max_tokens, seed)
        sample_tokens.append(int(sample["x"].shape[0]))
        runner = ExpertRunner(layer)
        need_outputs = spec.grouping in ("ream", "hc") or spec.weighting in ("saliency", "ream-repo")
        feats = layer_features(layer, runner, sample, outputs=need_outputs)
        if sequential:  # the routed sums describe the unmerged model: score on the re-gathered sample
            frequency = feats["frequency"]
            saliency = feats.get("reap", frequency)
        else:
            saliency, frequency = sal_all[li], freq_all[li]

        kl = k_layers[li]
        if spec.grouping == "ream":
            sim = ream_similarity(feats["gated"], sample["logits"])
            fn = lambda idx, kk: group_ream(saliency[idx], sim[idx][:, idx], kk,  # noqa: E731
                                            max(group_size, -(-len(idx) // max(kk, 1))))
        elif spec.grouping == "hc":
            fn = lambda idx, kk: group_hc(feats["mean"][idx], kk)  # noqa: E731
        else:
            dom = frequency if dominants == "frequency" else saliency
            fn = lambda idx, kk: group_msmoe(dom[idx], sample["logits"][:, idx], kk)  # noqa: E731
        if supers is not None:
            fn = _protecting(fn, set(supers[li].nonzero().flatten().tolist()))
        groups = order_groups(_within_router_groups(E, n_group, kl, fn), router_row, frequency, saliency)
        groups.sort(key=lambda g: g[0])
        weights = group_weights(groups, spec.weighting, frequency, saliency, feats.get("p2norm"))

        perms = None
        if spec.align != "none" and any(len(g) > 1 for g in groups):
            n = runner.n
            perms = torch.arange(n).repeat(E, 1)
            x_align = sample["x"][align_rows(sample["x"].shape[0], align_tokens, seed)]
            for g in groups:
                if len(g) == 1:
                    continue
                rep = g[0]
                w_rep = weight_features(layer, rep, n)
                act_rep = runner.hidden(rep, x_align) if spec.align == "ream" else None
                for m in g[1:]:
                    w_m = weight_features(layer, m, n)
                    if spec.align == "ream":
                        cost = ream_cost(act_rep, runner.hidden(m, x_align), *pca_rows(w_rep, w_m, pca_dims))
                    else:
                        cost = weight_matching_cost(w_rep, w_m)
                    perms[m] = hungarian(cost)
            permutations[li] = perms
        weights = [[round(w, 8) for w in ws] for ws in weights]  # as the plan stores them, so it replays exactly
        if access.merges():
            merge_layer(layer, groups, weights, perms, tied=tied)
        scores = saliency if spec.weighting == "saliency" or spec.grouping == "ream" else frequency
        plan_layers.append(MergeLayerPlan(
            layer.name, [g[0] for g in groups], [round(float(v), 8) for v in scores.tolist()],
            [list(g) for g in groups], [[round(w, 8) for w in ws] for ws in weights],
            _sha(perms) if perms is not None else ""))
        access.close(li, layer)
        say(f"{layer.name}: {E} -> {len(groups)} experts ({sample_tokens[-1]} sample tokens, "
            f"{time.perf_counter() - t0:.1f}s)")

    if tied:
        model.config.moe_slim = {"plan": "merge", "method": method, "tied": True}
    else:
        set_config_counts(model.config, family, k)
        model.config.moe_slim = {"plan": "merge", "method": method, "kept_per_layer": [k] * len(layers)}
    info = {
        "method": method, "grouping": spec.grouping, "alignment": spec.align, "weighting": spec.weighting,
        "router": spec.router, "router_row": router_row, "tied": tied, "pca_dims": pca_dims,
        "dominants": dominants if spec.grouping == "msmoe" else None, "global_dominants": global_dominants,
        "protect_super": protect_super,
        "ratio": ratio, "mix": mix, "group_size": group_size if spec.grouping == "ream" else None,
        "max_tokens": max_tokens, "align_tokens": align_tokens if spec.align != "none" else None,
        "sequential": sequential, "seed": seed, "sample_tokens_per_layer": sample_tokens,
        "permutations_file": PERMUTATIONS_FILE if permutations else None,
        "stats_fingerprint": stats.meta.get("model_fingerprint") if stats is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return MergePlan(family.name, E, family.top_k(model.config), plan_layers, info=info, permutations=permutations)


def _global_counts(scores: torch.Tensor, k: int) -> list[int]:
    """Dominants per layer when the ``k * L`` highest scores of the whole model dominate (at least one each)."""
    L, E = scores.shape
    share = scores / scores.sum(1, keepdim=True).clamp_min(1e-30)  # comparable across layers
    top = share.flatten().argsort(descending=True)[: k * L]
    counts = torch.bincount(top // E, minlength=L).clamp_min(1)
    return [int(c) for c in counts]


def _protecting(fn: Callable[[list[int], int], list[list[int]]], protected: set[int]
                ) -> Callable[[list[int], int], list[list[int]]]:
    """A grouping in which the ``protected`` experts stay alone (at most ``k - 1`` of them)."""

    def run(idx: list[int], kk: int) -> list[list[int]]:
        alone = [p for p, e in enumerate(idx) if e in protected][: max(kk - 1, 0)]
        rest = [p for p in range(len(idx)) if p not in alone]
        inner = fn([idx[p] for p in rest], kk - len(alone))
        return [[p] for p in alone] + [[rest[q] for q in g] for g in inner]

    return run
