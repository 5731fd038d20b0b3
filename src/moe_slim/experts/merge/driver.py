"""Merge a model's experts, layer by layer: features on the token sample, groups, alignment, averaging.

Every choice is one :class:`~.config.MergeOptions` (a method's defaults are data in :mod:`.methods`,
each reference's are presets in :mod:`.config`). Which tensor axis of each expert parameter holds the intermediate neurons comes
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
from .config import MergeOptions
from .methods import (
    MethodSpec,
    _check_request,
    method_spec,
    samples_hint,
)
from ..superexperts import super_experts
from .options import (
    align_rows,
    default_group_size,
    group_weights,
    lift_zeros,
    order_groups,
    pca_layer,
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
    options: MergeOptions | str = "ream",
    ratio: float = 0.5,
    *,
    mix: dict[str, float] | None = None,
    calibration: dict[str, list[str]] | None = None,
    tokenizer: Any = None,
    seq_len: int = 512,
    batch_size: int = 8,
    pack: bool = True,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    access: InMemoryLayers | None = None,
    **choices: Any,
) -> MergePlan:
    """Merge the experts of ``model`` in place to ``round(E * (1 - ratio))`` per layer; return the plan.

    ``options``: a :class:`~.config.MergeOptions`, or a method or preset name; ``choices`` are
    :class:`~.config.MergeOptions` fields given one by one (they win over ``options``). ``stats`` must
    hold token samples (``observe(..., samples=N)``) unless ``sequential``, which re-gathers each layer's
    sample from ``calibration`` texts (with ``tokenizer``, ``seq_len``, ``batch_size``, ``pack``) through
    the already merged layers. ``mix`` weights the calibration domains (saliency, frequency and the
    sample). ``progress``: a tqdm bar over the experts inside each layer. ``access`` reaches each layer's
    weights and sequential sample (default: the model is in memory; :mod:`.at_size` reads one layer at a time).
    """
    say = log or (lambda msg: None)
    access = access or InMemoryLayers()
    opts = MergeOptions.build(options, **choices).resolved()
    check_ratio(ratio)
    prepare_model(model)
    family = family_of(model)
    layers = moe_layers(model)
    E = check_uniform(layers)
    k = int(round(E * (1.0 - ratio)))
    groups_cfg = family.groups(model.config)
    n_group = groups_cfg[0] if groups_cfg else 1
    group_size = opts.group_size or default_group_size(E, k, n_group)
    spec = MethodSpec(opts.grouping, opts.align, opts.weighting, method_spec(opts.method).router)
    _check_request(family, model.config, E, k, spec, group_size)
    if opts.grouping == "ream":
        warn_group_size(group_size, E)
    _check_inputs(model, stats, opts, mix, calibration, tokenizer, n_group)
    started = time.perf_counter()

    batches, cap = _sequential_batches(opts, mix, calibration, tokenizer, seq_len, batch_size, pack)
    sal_all = freq_all = None
    if not opts.sequential:
        sal_all = score(stats, "reap", mix=mix)
        freq_all = score(stats, "frequency", mix=mix)
    supers = super_experts(stats, mix) if opts.protect_super else None
    k_layers = [k] * len(layers)
    if opts.global_dominants:
        k_layers = _global_counts(freq_all if opts.dominants == "frequency" else sal_all, k)

    plan_layers: list[MergeLayerPlan] = []
    permutations: dict[int, torch.Tensor] = {}
    sample_tokens: list[int] = []
    for li, layer in enumerate(layers):
        t0, c0 = time.perf_counter(), time.process_time()
        layer = access.open(li, layer)
        if opts.sequential:
            sample = access.gather(model, layer, batches, cap).take(li, mix, opts.max_tokens, opts.seed)
        else:
            sample = stats.samples.take(li, mix, opts.max_tokens, opts.seed)
        sample_tokens.append(int(sample["x"].shape[0]))
        runner = ExpertRunner(layer)
        bar = _bar(progress, layer.name, E)
        need_outputs = opts.grouping in ("ream", "hc") or opts.weighting not in ("frequency", "uniform")
        feats = layer_features(layer, runner, sample, outputs=need_outputs, tick=bar.update)
        if opts.sequential:  # the routed sums describe the unmerged model: score on the re-gathered sample
            frequency = feats["frequency"]
            saliency = feats.get("reap", frequency)
        else:
            saliency, frequency = sal_all[li], freq_all[li]
        rank = saliency if opts.centroids in (None, "reap") else lift_zeros(feats[opts.centroids])
        fn = _grouping(opts, feats, sample, rank, frequency, saliency, group_size)
        if supers is not None:
            fn = _protecting(fn, set(supers[li].nonzero().flatten().tolist()))
        groups = order_groups(_within_router_groups(E, n_group, k_layers[li], fn), opts.router_row, frequency, rank)
        groups.sort(key=lambda g: g[0])
        by = feats[opts.weighting] if opts.weighting.startswith("p2norm") else saliency
        weights = group_weights(groups, opts.weighting, frequency, by)
        perms = _alignments(layer, runner, sample, groups, opts, bar) if opts.align != "none" else None
        if perms is not None:
            permutations[li] = perms
        bar.close()
        weights = [[round(w, 8) for w in ws] for ws in weights]  # as the plan stores them, so it replays exactly
        if access.merges():
            merge_layer(layer, groups, weights, perms, tied=opts.tied)
        scores = rank if opts.grouping == "ream" else (saliency if opts.weighting == "saliency" else frequency)
        plan_layers.append(MergeLayerPlan(
            layer.name, [g[0] for g in groups], [round(float(v), 8) for v in scores.tolist()],
            [list(g) for g in groups], weights, _sha(perms) if perms is not None else ""))
        access.close(li, layer)
        say(f"{layer.name}: {E} -> {len(groups)} experts ({sample_tokens[-1]} sample tokens, "
            f"{time.perf_counter() - t0:.1f}s, {time.process_time() - c0:.1f}s CPU)")

    if opts.tied:
        model.config.moe_slim = {"plan": "merge", "method": opts.method, "tied": True}
    else:
        set_config_counts(model.config, family, k)
        model.config.moe_slim = {"plan": "merge", "method": opts.method, "kept_per_layer": [k] * len(layers)}
    info = {
        **opts.describe(), "alignment": opts.align, "router": spec.router, "ratio": ratio, "mix": mix,
        "group_size": group_size if opts.grouping == "ream" else None,
        "align_tokens": opts.align_tokens if opts.align != "none" else None,
        "dominants": opts.dominants if opts.grouping == "msmoe" else None,
        "sample_tokens_per_layer": sample_tokens,
        "permutations_file": PERMUTATIONS_FILE if permutations else None,
        "stats_fingerprint": stats.meta.get("model_fingerprint") if stats is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return MergePlan(family.name, E, family.top_k(model.config), plan_layers, info=info, permutations=permutations)


def _check_inputs(model: nn.Module, stats: RouterStats | None, opts: MergeOptions, mix: dict[str, float] | None,
                  calibration: dict[str, list[str]] | None, tokenizer: Any, n_group: int) -> None:
    """What the options need from the caller: calibration text for sequential, samples otherwise."""
    if opts.max_tokens < 1 or opts.align_tokens < 1:
        raise MoeSlimError("max_tokens and align_tokens must be positive token counts")
    if opts.sequential:
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
    if opts.global_dominants and (opts.sequential or n_group > 1):
        raise MoeSlimError("global dominants need saved statistics and a router without expert groups")
    if opts.protect_super and stats is None:
        raise MoeSlimError("protecting super-experts needs saved statistics (their largest output norms)")


def _sequential_batches(opts: MergeOptions, mix: dict[str, float] | None, calibration: dict[str, list[str]] | None,
                        tokenizer: Any, seq_len: int, batch_size: int, pack: bool) -> tuple[dict[str, list[Any]], int]:
    """Sequential merging: the calibration batches per domain (token shares by ``mix``) and the largest cap."""
    batches: dict[str, list[Any]] = {}
    cap = 0
    if not opts.sequential:
        return batches, cap
    weights = mix or {d: 1.0 for d in calibration}
    missing = [d for d in weights if d not in calibration]
    if missing:
        raise MoeSlimError(f"the calibration text has no domain {', '.join(missing)} (it has: {', '.join(calibration)})")
    total_w = sum(w for w in weights.values() if w > 0)
    for d, w in weights.items():
        if w <= 0:
            continue
        cap_d = max(1, int(opts.max_tokens * w / total_w))
        batches[d] = make_batches(tokenizer, calibration[d], seq_len=seq_len, batch_size=batch_size,
                                  max_tokens=cap_d, pack=pack)
        if not batches[d]:
            raise MoeSlimError(f"calibration domain '{d}' has no text")
        cap = max(cap, cap_d)
    return batches, cap


def _grouping(opts: MergeOptions, feats: dict[str, torch.Tensor], sample: dict[str, torch.Tensor],
              rank: torch.Tensor, frequency: torch.Tensor, saliency: torch.Tensor, group_size: int
              ) -> Callable[[list[int], int], list[list[int]]]:
    """The method's grouping of a list of expert ids into ``kk`` groups."""
    if opts.grouping == "ream":
        sim = ream_similarity(feats["gated"], sample["logits"][:, : feats["gated"].shape[0]])  # real experts' columns
        return lambda idx, kk: group_ream(rank[idx], sim[idx][:, idx], kk,  # noqa: E731
                                          max(group_size, -(-len(idx) // max(kk, 1))))
    if opts.grouping == "hc":
        return lambda idx, kk: group_hc(feats["mean"][idx], kk)  # noqa: E731
    dom = frequency if opts.dominants == "frequency" else saliency
    return lambda idx, kk: group_msmoe(dom[idx], sample["logits"][:, idx], kk)  # noqa: E731


def _alignments(layer: Any, runner: ExpertRunner, sample: dict[str, torch.Tensor], groups: list[list[int]],
                opts: MergeOptions, bar: Any) -> torch.Tensor | None:
    """Each member's neuron order aligned to its group's first member ``[E, n]`` (None: nothing to align)."""
    if not any(len(g) > 1 for g in groups):
        return None
    n, E = runner.n, layer.num_experts
    bar.total = bar.n + sum(len(g) - 1 for g in groups)  # one alignment per merged member
    bar.refresh()
    perms = torch.arange(n).repeat(E, 1)
    x_align = sample["x"][align_rows(sample["x"].shape[0], opts.align_tokens, opts.seed)]
    projected = None
    if opts.align == "ream" and opts.pca == "layer":
        projected = pca_layer(torch.stack([weight_features(layer, e, n) for e in range(E)]), opts.pca_dims)
    dims = opts.pca_dims if opts.pca == "pair" else 0
    for g in groups:
        if len(g) == 1:
            continue
        rep = g[0]
        w_rep = projected[rep] if projected is not None else weight_features(layer, rep, n)
        act_rep = runner.hidden(rep, x_align) if opts.align == "ream" else None
        for m in g[1:]:
            w_m = projected[m] if projected is not None else weight_features(layer, m, n)
            if opts.align == "ream":
                cost = ream_cost(act_rep, runner.hidden(m, x_align), *pca_rows(w_rep, w_m, dims))
            else:
                cost = weight_matching_cost(w_rep, w_m)
            perms[m] = hungarian(cost)
            bar.update(1)
    return perms


def _bar(progress: bool, name: str, n_experts: int) -> Any:
    """A tqdm bar over the layer's expert passes (outputs, then one alignment per merged member)."""
    from tqdm.auto import tqdm

    return tqdm(total=n_experts, desc=name, unit="expert", leave=False, disable=not progress)


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
