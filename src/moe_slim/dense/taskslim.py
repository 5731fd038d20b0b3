"""Task-specific slimming, the setting of ProbScale's claim: probe, select, fine-tune, compare.

For one labelled task: probe every layer of the pretrained model on the task's *training* texts
(cross-validated logistic regression, :mod:`.probes`), choose the layers to keep under a budget
(:func:`moe_slim.dense.baselines.task_selections`: ProbScale and every baseline at one parameter count),
then fine-tune the slimmed model and the full model on the same training texts with one recipe
(:mod:`.classify`) and score both on held-out test texts. Retention = slim accuracy / full accuracy,
with a paired bootstrap interval over the test items. No choice here looks at the test texts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import MoeSlimError
from .baselines import task_selections
from .classify import FinetuneConfig, correct, finetune, readout_pooling, to_classifier
from .family import layer_param_counts
from .features import extract_features
from .probes import ProbeMatrix, probe_matrix
from .select import Selection, layer_relevance, parse_budget, significant_gains
from .slim import slim_copy
from .tasks import Task


def split_task(task: Task, test_fraction: float = 0.2, seed: int = 0) -> tuple[Task, Task]:
    """A seeded stratified train/test split (each label split in the same proportion)."""
    if not 0 < test_fraction < 1:
        raise MoeSlimError(f"test fraction {test_fraction} must be between 0 and 1")
    rng = random.Random(seed)
    by = task.indices_by_label()
    test: list[int] = []
    for lab in sorted(by):
        idx = by[lab][:]
        rng.shuffle(idx)
        n = max(1, round(test_fraction * len(idx)))
        if n >= len(idx):
            raise MoeSlimError(f"task {task.name}: label {lab!r} has {len(idx)} example(s); give at least 2 per "
                               "label so one can be held out for testing")
        test += idx[:n]
    held = set(test)

    def pick(keep: list[int], suffix: str) -> Task:
        return Task(task.name, [task.texts[i] for i in keep], [task.labels[i] for i in keep],
                    f"{task.source} ({suffix})", dict(task.meta))

    return (pick([i for i in range(len(task.texts)) if i not in held], "train"),
            pick(sorted(held), f"test {test_fraction:.0%}"))


PROBE_POOLINGS = ("mean", "readout")


def probe_task(model: torch.nn.Module, tokenizer: Any, train: Task, *, max_length: int = 64, batch_size: int = 16,
               n_folds: int = 5, seed: int = 0, truncation: str = "left", pooling: str = "mean") -> ProbeMatrix:
    """P[layer] for one task: cross-validated probe accuracy of every layer on the training texts (truncated
    on the same side as the fine-tuning, so probes and classifiers read the same tokens).

    ``pooling``: ``mean`` over the tokens (what a frozen layer exposes), or ``readout``, the token the
    family's sequence classifier reads (:func:`.classify.readout_pooling`: [CLS] for encoders, the last
    token for decoders)."""
    if pooling not in PROBE_POOLINGS:
        raise MoeSlimError(f"unknown probe pooling {pooling!r}; choose one of {', '.join(PROBE_POOLINGS)}")
    train.validate(min_per_class=n_folds)
    old = tokenizer.truncation_side
    tokenizer.truncation_side = truncation
    try:
        feats = extract_features(model, tokenizer, train.texts, max_length=max_length, batch_size=batch_size,
                                 pooling=readout_pooling(model) if pooling == "readout" else "mean")
    finally:
        tokenizer.truncation_side = old
    return probe_matrix([feats], [train], {train.name: 1.0}, n_folds=n_folds, seed=seed)


def plans_for_task(model: torch.nn.Module, pm: ProbeMatrix, budget: str, *, random_seeds: tuple[int, ...] = (0, 1, 2)
                   ) -> dict[str, Selection]:
    """Every method's plan at the ProbScale plan's exact parameter count for ``budget`` (e.g. ``x5``)."""
    lp = layer_param_counts(model)
    return task_selections(pm, lp, parse_budget(budget, lp), random_seeds=random_seeds)


def probe_summary(pm: ProbeMatrix) -> dict[str, Any]:
    """What the probes say: accuracy per layer, the relevance the plan maximises, how many gains are real."""
    stack = list(pm.accuracy)[-1]
    return {"accuracy": np.round(pm.accuracy[stack][:, 0], 4).tolist(),
            "relevance": np.round(layer_relevance(pm)[stack], 5).tolist(),
            "block_influence": np.round(pm.block_influence[stack], 5).tolist(),
            "significant_gains": significant_gains(pm)[stack], "examples": pm.meta.get("examples"),
            "chance": pm.chance}


def finetune_and_score(model: torch.nn.Module, tokenizer: Any, keep: dict[str, list[int]] | None, train: Task,
                       test: Task, cfg: FinetuneConfig, *, log: Callable[[str], None] | None = None,
                       return_model: bool = False) -> dict[str, Any]:
    """Slim (``keep``; None = the full model), fine-tune on ``train`` with ``cfg``, score on ``test``.

    The pretrained model is never changed: the classifier gets its own copy of the kept weights."""
    t0 = time.time()
    src = slim_copy(model, keep) if keep is not None else model
    clf = to_classifier(src, tokenizer, sorted(set(train.labels) | set(test.labels)), seed=cfg.seed)
    del src
    info = finetune(clf, tokenizer, train, cfg, log=log)
    hits = correct(clf, tokenizer, test, max_length=cfg.max_length, truncation=cfg.truncation)
    out = {"keep": keep, "accuracy": float(hits.mean()), "n": len(hits), "hits": hits.tolist(), "finetune": info,
           "params": sum(p.numel() for p in clf.base_model.parameters()),
           "layer_params": sum(sum(v) for v in layer_param_counts(clf).values()),
           "seconds": round(time.time() - t0, 1)}
    if return_model:
        out["model"] = clf
    return out


def retention_interval(slim_hits: np.ndarray, full_hits: np.ndarray, *, samples: int = 2000, seed: int = 0
                       ) -> dict[str, Any]:
    """slim accuracy / full accuracy on the same test items, with a 95% paired bootstrap interval."""
    a, b = np.asarray(slim_hits, float), np.asarray(full_hits, float)
    if len(a) != len(b) or not len(a):
        raise MoeSlimError("retention needs the same non-empty test items for both models")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    fb = b[idx].mean(1)
    boot = np.where(fb > 0, a[idx].mean(1) / np.where(fb > 0, fb, 1), np.nan)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    full = b.mean()
    return {"retention": float(a.mean() / full) if full > 0 else float("nan"), "ci95": [float(lo), float(hi)],
            "n": len(a), "accuracy": float(a.mean()), "full_accuracy": float(full)}
