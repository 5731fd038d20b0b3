"""The ``probe`` run end to end: probes, selection, scaling fit and check, plots, plan.

Outputs (one directory, written atomically)::

    probe_matrix.json / .csv   P[layer, task] (accuracy, skill), Block Influence, relevance
    plan.json                  the ProbScale selection that ``moe-slim slim-dense`` applies
    plans/<method>.json        the same budget for every method (baselines included)
    scaling.json               measured retention per budget, the power-law fit, predicted vs measured
    compare.json               every method measured at the plan's budget (unless compare=False)
    probe_matrix.png, scaling.png
    summary.json               what was run, on what, with which libraries
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MoeSlimError
from ..fingerprint import library_versions, model_fingerprint
from ..outputs import atomic_dir, check_output
from .family import family_for, layer_param_counts
from .features import Features, extract_features
from .plots import plot_probe_matrix, plot_scaling
from .probes import DEFAULT_CS, ProbeMatrix, final_scores, probe_matrix, split_features
from .scaling import ScalingFit, fit_scaling
from .select import (
    NOISE_Z,
    SELECTIONS,
    Selection,
    all_selections,
    layer_relevance,
    significant_gains,
    parse_budget,
    round_up_budget,
    select_filled,
)
from .slim import make_plan, slim_copy
from .tasks import Task, load_tasks, parse_weights

DEFAULT_SCALING_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8)
RETAIN_TARGETS: tuple[float, ...] = (0.95, 0.98)
ABOVE_CHANCE_MIN = 0.05  # a task whose full model is closer to chance than this has no above-chance retention


def _stderr(msg: str) -> None:
    print(f"moe-slim: {msg}", file=sys.stderr, flush=True)


class Measurer:
    """Slims copies of a model and measures the probe on their final representation."""

    def __init__(self, model: Any, tokenizer: Any, tasks: list[Task], weights: dict[str, float], *,
                 pooling: str = "mean", max_length: int = 128, batch_size: int = 16, n_folds: int = 5,
                 seed: int = 0, Cs: tuple[float, ...] = DEFAULT_CS) -> None:
        self.model, self.tokenizer, self.tasks = model, tokenizer, tasks
        w = np.array([weights.get(t.name, 1.0) for t in tasks], float)
        self.w = w / w.sum()
        self.kw = dict(pooling=pooling, max_length=max_length, batch_size=batch_size)
        self.pkw = dict(n_folds=n_folds, seed=seed, Cs=Cs)
        self.texts = [x for t in tasks for x in t.texts]
        self.sizes = [len(t.texts) for t in tasks]
        self.reference: dict[str, float] | None = None
        self.full: list[Features] | None = None
        self.cache: dict[str, dict[str, Any]] = {}

    def features(self, model: Any, final_only: bool) -> list[Features]:
        return split_features(extract_features(model, self.tokenizer, self.texts, final_only=final_only, **self.kw),
                              self.sizes)

    def slim_copy(self, keep: dict[str, list[int]]) -> Any:
        """A slimmed copy of the model that shares the weight tensors (no weight is copied)."""
        return slim_copy(self.model, keep)

    def _prefix_rows(self, keep: dict[str, list[int]]) -> dict[str, int] | None:
        if self.full is None or len(self.full[0].pooled) != 1:
            return None  # (an encoder-decoder's decoder sees a different encoder output)
        (stack, rows), = self.full[0].pooled.items()
        idx = keep.get(stack, list(range(rows.shape[0] - 1)))
        return {stack: len(idx)} if list(idx) == list(range(len(idx))) else None

    def set_reference(self, pm: ProbeMatrix, full: list[Features] | None = None) -> None:
        """Use the probe matrix of these same texts: the full model's final row is the reference."""
        self.full = full
        last = list(pm.accuracy)[-1]
        self.reference = {t: float(pm.accuracy[last][-1, i]) for i, t in enumerate(pm.tasks)}

    def compute_reference(self) -> dict[str, float]:
        """One pass of the full model over these texts (held-out measuring): the reference scores."""
        self.full = self.features(self.model, final_only=False)
        scores = final_scores(self.full, self.tasks, **self.pkw)
        self.reference = {t: s["accuracy"] for t, s in scores.items()}
        return self.reference

    def measure(self, keep: dict[str, list[int]]) -> dict[str, Any]:
        key = json.dumps(keep, sort_keys=True)
        if key in self.cache:
            return self.cache[key]
        assert self.reference is not None
        prefix = self._prefix_rows(keep)
        if prefix is not None:
            # keeping layers 0..k-1 only: the slimmed model's output is exactly row k of the full model's
            # (final-normed) features, so no forward pass is needed
            feats = [Features({s: f.pooled[s][r:r + 1] for s, r in prefix.items()}, {}, 0, f.pooling)
                     for f in self.full]
        else:
            feats = self.features(self.slim_copy(keep), final_only=True)
        out = self._score(feats)
        self.cache[key] = out
        return out

    def measure_model(self, model: Any) -> dict[str, Any]:
        """Probe retention of any model with the same tokenizer (e.g. a slimmed model after healing)."""
        return self._score(self.features(model, final_only=True))

    def _score(self, feats: list[Features]) -> dict[str, Any]:
        assert self.reference is not None
        scores = final_scores(feats, self.tasks, **self.pkw)
        per_task = {}
        for t in self.tasks:
            ref = self.reference[t.name]
            acc = scores[t.name]["accuracy"]
            chance = scores[t.name]["chance"]
            per_task[t.name] = {
                "accuracy": acc, "full_accuracy": ref, "retention": acc / ref if ref > 0 else float("nan"),
                "chance": chance,
                "retention_above_chance": (acc - chance) / (ref - chance) if ref - chance >= ABOVE_CHANCE_MIN
                else float("nan"),
            }
        ret = float(sum(wi * per_task[t.name]["retention"] for wi, t in zip(self.w, self.tasks)))
        # above-chance retention only where the full model is clearly above chance (else it is 0/0 noise)
        usable = [(wi, t) for wi, t in zip(self.w, self.tasks)
                  if self.reference[t.name] - per_task[t.name]["chance"] >= ABOVE_CHANCE_MIN]
        ret_c = float(sum(wi * per_task[t.name]["retention_above_chance"] for wi, t in usable)
                      / sum(wi for wi, _ in usable)) if usable else float("nan")
        return {"retention": ret, "retention_above_chance": ret_c, "tasks": per_task}


def scaling_sweep(measurer: Measurer, relevance: dict[str, np.ndarray], layer_params: dict[str, list[int]], *,
                  fractions: tuple[float, ...] = DEFAULT_SCALING_FRACTIONS, contiguous: bool = True,
                  targets: tuple[float, ...] = RETAIN_TARGETS, log: Callable[[str], None] = _stderr
                  ) -> dict[str, Any]:
    """Measure ProbScale at several budgets, fit the power law, then check its predicted budgets."""
    total = sum(sum(v) for v in layer_params.values())
    minimum = sum(min(v) for v in layer_params.values())
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    for f in fractions:
        budget = max(int(f * total), minimum)
        sel = select_filled(relevance, layer_params, budget, contiguous=contiguous, method="probscale")
        key = json.dumps(sel.keep, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        t0 = time.time()
        m = measurer.measure(sel.keep)
        points.append({"budget_fraction": f, "fraction": sel.fraction, "params": sel.params, "keep": sel.keep,
                       "retention": m["retention"], "retention_above_chance": m["retention_above_chance"],
                       "tasks": m["tasks"]})
        log(f"scaling: kept {sel.fraction:.3f} of layer params -> retention {m['retention']:.4f} "
            f"({time.time() - t0:.0f}s)")
    fit_pts = [(p["fraction"], p["retention"]) for p in points] + [(1.0, 1.0)]
    fit = fit_scaling(fit_pts)
    for w in (fit.warnings or []) if fit is not None else []:
        log(f"scaling fit unreliable: {w}; its 95%/98% predictions are marked unreliable")
    checks = []
    for target in targets:
        chk: dict[str, Any] = {"target": target, "predicted_fraction": None, "fraction": None,
                               "measured_retention": None, "reliable": bool(fit is not None and fit.reliable)}
        x = fit.budget_for(target) if fit is not None else None
        if x is None:
            chk["note"] = "the fit does not reach this retention below the full model" if fit else "no fit"
            checks.append(chk)
            continue
        budget = round_up_budget(x * total, layer_params)
        sel = select_filled(relevance, layer_params, budget, contiguous=contiguous, method="probscale")
        m = measurer.measure(sel.keep)
        if x < min(p["fraction"] for p in points):
            chk["note"] = "extrapolated below the smallest measured budget"
        chk.update({"predicted_fraction": x, "predicted_reduction": 1 / x if x > 0 else None, "budget_params": budget,
                    "fraction": sel.fraction, "params": sel.params, "keep": sel.keep,
                    "predicted_retention_at_selected": float(fit(sel.fraction)),
                    "measured_retention": m["retention"], "error": m["retention"] - target, "tasks": m["tasks"]})
        log(f"scaling check: {target:.0%} predicted at {x:.3f} of layer params; kept {sel.fraction:.3f}, "
            f"measured {m['retention']:.4f}")
        checks.append(chk)
    return {"fit": fit.to_json() if fit else None, "points": points, "checks": checks,
            "_fit": fit}


def run_probe(
    model_path: str | os.PathLike,
    tasks: str | list[str] | list[Task],
    out: str | os.PathLike,
    *,
    weights: str | dict[str, float] | None = None,
    budget: str | None = None,
    selection: str = "contiguous",
    data_dir: str | os.PathLike = "data",
    split: str | None = None,
    per_class: int | None = 100,
    seed: int = 0,
    pooling: str = "mean",
    max_length: int = 128,
    batch_size: int = 16,
    n_folds: int = 5,
    scaling_fractions: tuple[float, ...] | None = None,
    compare: bool = True,
    eval_tasks: str | list[str] | list[Task] | None = None,
    eval_split: str | None = None,
    overwrite: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    log: Callable[[str], None] = _stderr,
    model_eval: str = "auto",
    mc_limit: int = 40,
    heal_steps: int = 0,
) -> dict[str, Any]:
    """Probe MODEL on TASKS, choose layers for BUDGET, fit the scaling law, write everything to OUT.

    ``budget``: a spec for :func:`parse_budget`, or ``retain:0.95`` (the default) for the budget
    the scaling fit predicts for that retention. ``scaling_fractions``: the budgets of the scaling sweep;
    None (the default) runs it only for a ``retain:`` budget, which needs it (an explicit budget does not,
    and the sweep is the slowest part of a run); ``()`` never. ``eval_tasks`` (or ``eval_split`` for the built-in
    tasks): held-out texts on which every retention is measured (default: the probing texts).
    ``model_eval``: also score every compared plan on the model's own outputs (:mod:`.measure`; the headline
    retention): ``on``, ``off``, or ``auto`` (on when ``data_dir`` holds the test splits). ``heal_steps``:
    heal every compared plan equally (:mod:`.heal`) and score it again. ``selection``: ``contiguous`` (plan.json removes one
    block of layers per stack) or ``free`` (any subset); both are written to ``plans/``. ``model``/``tokenizer`` may be passed already loaded.
    """
    from .slim import load_dense

    t_start = time.time()
    check_output(out, overwrite, inputs=[model_path] if model_path is not None else [], kind="probe")
    if selection not in SELECTIONS:
        raise MoeSlimError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    contiguous = selection == "contiguous"
    budget = budget or "retain:0.95"
    retain_target: float | None = None
    if budget.startswith("retain:"):
        try:
            retain_target = float(budget.split(":", 1)[1])
        except ValueError:
            raise MoeSlimError(f"budget {budget!r}: give the retention as a number, e.g. retain:0.95") from None
        if not 0 < retain_target <= 1.2:
            raise MoeSlimError(f"budget {budget!r}: the retention target must be in (0, 1.2]")
        if scaling_fractions is None:
            scaling_fractions = DEFAULT_SCALING_FRACTIONS
        if not scaling_fractions:
            raise MoeSlimError("a retain:X budget needs the scaling sweep; give an explicit --budget instead")
    task_list = tasks if tasks and isinstance(tasks, list) and isinstance(tasks[0], Task) else \
        load_tasks(tasks, data_dir, split=split, per_class=per_class, seed=seed)
    if n_folds < 2:
        raise MoeSlimError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    for t in task_list:
        t.validate(min_per_class=n_folds)
    w = weights if isinstance(weights, dict) else parse_weights(weights, task_list)
    held_out: list[Task] | None = None
    if eval_tasks is not None or eval_split is not None:
        spec = eval_tasks if eval_tasks is not None else tasks
        if isinstance(spec, list) and spec and isinstance(spec[0], Task):
            held_out = spec
        else:
            if not isinstance(spec, str) and not (isinstance(spec, list) and all(isinstance(x, str) for x in spec)):
                raise MoeSlimError("with eval_split, give the tasks by name (built-ins) or pass eval_tasks")
            held_out = load_tasks(spec, data_dir, split=eval_split or split, per_class=per_class, seed=seed)
        if sorted(t.name for t in held_out) != sorted(t.name for t in task_list):
            raise MoeSlimError(f"held-out tasks ({', '.join(t.name for t in held_out)}) must be the probing tasks "
                               f"({', '.join(t.name for t in task_list)})")
        for t in held_out:
            t.validate(min_per_class=n_folds)
        sel_texts = {x for t in task_list for x in t.texts}
        overlap = sum(x in sel_texts for t in held_out for x in t.texts)
        if overlap == sum(len(t.texts) for t in held_out):
            raise MoeSlimError("the held-out texts are the probing texts; give another split or other files")
        held_out.sort(key=lambda t: [x.name for x in task_list].index(t.name))
    if model is None:
        model, tokenizer = load_dense(model_path)
    family = family_for(model)
    layer_params = layer_param_counts(model)
    total = sum(sum(v) for v in layer_params.values())
    budget_params = None if retain_target is not None else parse_budget(budget, layer_params)
    log(f"{family.name} model, {sum(len(v) for v in layer_params.values())} layers, {total:,} layer parameters; "
        f"tasks {', '.join(f'{t.name} ({len(t.texts)})' for t in task_list)}")

    measurer = Measurer(model, tokenizer, task_list, w, pooling=pooling, max_length=max_length,
                        batch_size=batch_size, n_folds=n_folds, seed=seed)
    t0 = time.time()
    feats = measurer.features(model, final_only=False)
    log(f"features: {feats[0].pooled[next(iter(feats[0].pooled))].shape[0]} rows per stack, "
        f"{time.time() - t0:.0f}s")
    t0 = time.time()
    pm = probe_matrix(feats, task_list, w, n_folds=n_folds, seed=seed)
    pm.meta.update({"model": str(model_path), "family": family.name, "max_length": max_length})
    if held_out is None:
        measurer.set_reference(pm, feats)
    else:
        t0 = time.time()
        measurer = Measurer(model, tokenizer, held_out, w, pooling=pooling, max_length=max_length,
                            batch_size=batch_size, n_folds=n_folds, seed=seed)
        measurer.compute_reference()
        log(f"held-out reference: {sum(len(t.texts) for t in held_out)} texts, {time.time() - t0:.0f}s; accuracy "
            + ", ".join(f"{t}={a:.3f}" for t, a in measurer.reference.items()))
    last = list(pm.accuracy)[-1]
    log(f"probes: {sum(v.size for v in pm.accuracy.values())} fits in {time.time() - t0:.0f}s; final-layer "
        f"accuracy {', '.join(f'{t}={pm.accuracy[last][-1, i]:.3f}' for i, t in enumerate(pm.tasks))}")
    relevance = layer_relevance(pm)
    significant = significant_gains(pm)
    n_layers = sum(len(v) for v in layer_params.values())
    if sum(significant.values()) < n_layers:
        log(f"warning: {n_layers - sum(significant.values())} of {n_layers} layers' probe gains are within "
            f"{NOISE_Z} standard errors of zero (n = {pm.meta.get('examples')}); the plan treats them as no "
            "gain and orders them by Block Influence" + (" - every layer: the plan is Block Influence's, "
                                                          "more examples per task would let the probes decide"
                                                          if not any(significant.values()) else ""))

    scaling: dict[str, Any] | None = None
    fit: ScalingFit | None = None
    if scaling_fractions:
        scaling = scaling_sweep(measurer, relevance, layer_params, fractions=tuple(scaling_fractions),
                                contiguous=contiguous, targets=tuple(sorted({*RETAIN_TARGETS, *(
                                    [retain_target] if retain_target else [])})), log=log)
        fit = scaling.pop("_fit")
    if retain_target is not None:
        x = fit.budget_for(retain_target) if fit is not None else None
        if x is None:
            raise MoeSlimError(f"the scaling fit does not predict a budget below the full model for "
                               f"{retain_target:.0%} retention; give an explicit --budget")
        budget_params = round_up_budget(x * total, layer_params)
    assert budget_params is not None

    selections = all_selections(pm, layer_params, budget_params, seed=seed)
    primary = selections[f"probscale-{selection}"]
    comparison: dict[str, Any] = {}
    if compare:
        for name, sel in selections.items():
            m = measurer.measure(sel.keep)
            comparison[name] = {**sel.to_json(), "fraction": sel.fraction, **m}
            log(f"compare: {name:22s} kept {sel.fraction:.3f} -> retention {m['retention']:.4f}")
    own_table = None
    if compare and (heal_steps or model_eval != "off"):
        from .compare import own_outputs_table

        own_table = own_outputs_table(model, tokenizer, selections, data_dir=data_dir, model_eval=model_eval,
                                      mc_limit=mc_limit, heal_steps=heal_steps, max_length=max_length,
                                      batch_size=batch_size, pooling=pooling, seed=seed, log=log)
        for name, e in (own_table or {}).get("methods", {}).items():
            comparison[name].update({k: e[k] for k in ("own", "own_healed", "heal") if k in e})

    source = str(model_path)
    fp = model_fingerprint(model)
    budget_info = {"spec": budget, "params": budget_params, "fraction": budget_params / total,
                   "achieved_params": primary.params, "achieved_fraction": primary.fraction,
                   "achieved_reduction": total / primary.params,
                   "kept_layers": sum(len(k) for k in primary.keep.values()),
                   "layers": sum(len(v) for v in layer_params.values())}

    def plan_for(sel: Selection) -> dict[str, Any]:
        measured = comparison.get(sel.method)
        return make_plan(model, sel.keep, method=sel.method, source=source, budget=budget_info,
                         selection=sel.to_json(), tasks=pm.tasks, weights=w,
                         relevance={k: np.round(v, 6).tolist() for k, v in relevance.items()},
                         measured={"retention": measured["retention"], "tasks": measured["tasks"]}
                         if measured else None)

    summary = {
        "model": source, "fingerprint": fp, "family": family.name, "tasks": {t.name: {
            "examples": len(t.texts), "classes": t.counts(), "source": t.source} for t in task_list},
        "weights": w, "measured_on": "held-out texts" if held_out is not None else "the probing texts",
        "held_out_tasks": {t.name: {"examples": len(t.texts), "source": t.source} for t in held_out or []},
        "pooling": pooling, "max_length": max_length, "n_folds": n_folds, "seed": seed,
        "layer_params": layer_params, "total_layer_params": total, "budget": budget_info,
        "plan": primary.to_json(), "selection": selection,
        "relevance": f"sum_t w_t (P[l,t]-P[l-1,t]) + 1e-3 * BI[l]  (signed marginal probe gain; gains within "
                     f"{NOISE_Z} standard errors of zero count as zero)",
        "layers_with_significant_gain": significant,
        "libraries": library_versions(), "seconds": round(time.time() - t_start, 1),
    }
    with atomic_dir(out, overwrite=overwrite, kind="probe") as tmp:
        mj = pm.to_json()
        mj["relevance"] = {k: np.round(v, 6).tolist() for k, v in relevance.items()}
        (tmp / "probe_matrix.json").write_text(json.dumps(mj, indent=1) + "\n")
        (tmp / "probe_matrix.csv").write_text(pm.to_csv())
        (tmp / "plan.json").write_text(json.dumps(plan_for(primary), indent=1) + "\n")
        (tmp / "plans").mkdir()
        for name, sel in selections.items():
            (tmp / "plans" / f"{name}.json").write_text(json.dumps(plan_for(sel), indent=1) + "\n")
        if scaling is not None:
            (tmp / "scaling.json").write_text(json.dumps(scaling, indent=1) + "\n")
        if comparison:
            (tmp / "compare.json").write_text(json.dumps(comparison, indent=1) + "\n")
        if own_table:
            (tmp / "own_outputs.json").write_text(json.dumps(own_table, indent=1, default=str) + "\n")
        plot_probe_matrix(pm, tmp / "probe_matrix.png", relevance, primary.keep,
                          title=f"{Path(source).name}: probe accuracy")
        if scaling is not None and scaling["points"]:
            plot_scaling(fit, scaling["points"], tmp / "scaling.png", checks=scaling["checks"],
                         compare=comparison, title=f"{Path(source).name}: retention vs parameters")
        summary["seconds"] = round(time.time() - t_start, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return {"out": str(out), "plan": primary, "selections": selections, "matrix": pm, "relevance": relevance,
            "scaling": scaling, "compare": comparison, "summary": summary, "measurer": measurer,
            "layer_params": layer_params, "model": model, "tokenizer": tokenizer}
