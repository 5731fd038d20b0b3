"""The markdown report of ``bench_probscale_tasks.py``: retention per task, budget and method, ProbScale
minus each baseline with paired bootstrap intervals, where the probes changed the plan, the scaling fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from figures import difference_text
from moe_slim.dense.measure import paired_difference
from moe_slim.dense.scaling import fit_scaling
from moe_slim.dense.taskslim import retention_interval

BASELINES = ("block-influence", "angular", "first-n", "last-n", "evenly-spaced", "random")
TARGET = 0.95


def _hits(entry: dict, method: str, budget: str) -> np.ndarray | None:
    """Per-item hits of a method's plan (``random``: the mean of its seeds, per item)."""
    plans = entry["budgets"][budget]
    names = [m for m in plans if m.startswith("random-")] if method == "random" else [method]
    runs = [entry["runs"].get(plans[m]["key"]) for m in names if m in plans]
    if not runs or any(r is None for r in runs):
        return None
    return np.mean([np.asarray(r["hits"], float) for r in runs], axis=0)


def _row(entry: dict, method: str, budget: str, full: np.ndarray) -> str:
    plan = entry["budgets"][budget][method]
    run = entry["runs"].get(plan["key"])
    if run is None:
        return f"| {method} | {list(plan['keep'].values())[0]} | not run | | |"
    r = retention_interval(np.asarray(run["hits"]), full)
    return (f"| {method} | {list(plan['keep'].values())[0]} | {r['accuracy']:.3f} | {r['retention']:.3f} "
            f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {run['seconds']:.0f} |")


SETTINGS = ("finetune", "train_per_class", "test_per_class")
VARIANTS = (("probscale-readout", "probe_readout"),)  # ProbScale on another probe pooling, and its probe summary


def _load_text(res: dict) -> str:
    """The machine's load while the fine-tunes ran (recorded per run; older runs did not record it)."""
    loads = [r["load_avg"] for e in res["tasks"].values() for r in e["runs"].values() if "load_avg" in r]
    if not loads:
        return ", beside other jobs"
    total = sum(len(e["runs"]) for e in res["tasks"].values())
    runs = f"{len(loads)} runs" if len(loads) == total else f"{len(loads)} of {total} runs; older runs did not record it"
    return f"; 1-minute load average while they ran {min(loads):.1f}-{max(loads):.1f} ({runs})"


def _variant_lines(entry: dict, tname: str, budget: str, full: np.ndarray) -> list[str]:
    """ProbScale on the classifier's readout token, minus mean-probe ProbScale and minus Block Influence."""
    out = []
    for method, _ in VARIANTS:
        a = _hits(entry, method, budget)
        if a is None:
            continue
        diffs = []
        for b in ("probscale-contiguous", "block-influence"):
            h = _hits(entry, b, budget)
            d = paired_difference({tname: a}, {tname: h}, scale=float(full.mean()))
            diffs.append(f"{b} {difference_text(d['delta'], d['ci95'], 3)}")
        out.append(f"{method} (plan {list(entry['budgets'][budget][method]['keep'].values())[0]}) minus: "
                   + "; ".join(diffs) + ".")
    return out


def recipe_text(res: dict) -> str:
    """The fine-tuning recipe and data sizes of a run, in words."""
    ft = res["finetune"]
    trained = "all kept layers" if ft["train_layers"] is None else f"the top {ft['train_layers']} kept layer(s)"
    return (f"transformers' sequence classifier, {ft['steps']} AdamW steps, batch {ft['batch_size']}, {ft['max_length']} "
            f"tokens (truncated on the {ft['truncation']}), lr {ft['lr']} (head {ft['head_lr']}), seed {ft['seed']}; "
            f"trained: {trained}, the final norm/pooler and the head; embeddings frozen. Train: {res['train_per_class']} "
            f"texts per label (train split); test: {res['test_per_class']} per label (test split)")


def model_section(res: dict) -> tuple[list[str], list[dict]]:
    lines = [f"## {res['model']}", "",
             f"Fine-tuning, the same for the full model and every plan of a task: {recipe_text(res)} (a task with "
             "its own recipe says so under its name). Probes: 5-fold cross-validated logistic regression "
             f"on the training texts. Budgets count transformer-layer parameters "
             f"(embeddings out; all layers are the same size, so x5 keeps a fifth of the layers); the "
             f"{res['embedding_params']:,} embedding parameters are kept by every plan; each budget's heading gives "
             f"the ratio with them in. {res.get('threads', 1)} thread(s) per process, on 2 CPU cores"
             f"{_load_text(res)}.", ""]
    summary = []
    for tname, entry in res["tasks"].items():
        full_run = entry["runs"].get("full")
        if full_run is None:
            lines += [f"### {tname}: not run", ""]
            continue
        full = np.asarray(full_run["hits"], float)
        pr = entry["probe"]
        n = len(full)
        lines += [f"### {tname}", ""]
        if "recipe" in entry:
            lines += [f"Recipe of this task, the same for the full model and every plan: {recipe_text(entry['recipe'])}.",
                      ""]
        lines += [f"Full model fine-tuned: accuracy {full.mean():.3f} (n = {n}; {full_run['seconds']:.0f} s). "
                  f"Probe accuracy per layer (row 0 = embeddings, n = {sum(entry['train'].values())}): "
                  f"{pr['accuracy']}; probe gains beyond 1.96 standard errors on {pr['significant_gains']} layers.",
                  *[f"{m} probes ({entry[key].get('pooling', '')}: the token the classifier reads): accuracy per layer "
                    f"{entry[key]['accuracy']}; gains beyond noise on {entry[key]['significant_gains']} layers."
                    for m, key in VARIANTS if key in entry], ""]
        points = []
        for budget, plans in entry["budgets"].items():
            ps = plans["probscale-contiguous"]
            emb = res["embedding_params"]
            with_emb = (emb + ps["total_layer_params"]) / (emb + ps["retained_layer_params"])
            lines += [f"**{budget}** (keep {len(list(ps['keep'].values())[0])} layers, {ps['reduction']:.2f}x fewer "
                      f"layer parameters; {with_emb:.2f}x fewer with the embeddings counted)",
                      "", "| method | kept | accuracy | retention [95% CI] | s |", "|---|---|---|---|---|"]
            lines += [_row(entry, m, budget, full) for m in plans] + [""]
            a = _hits(entry, "probscale-contiguous", budget)
            diffs = []
            if a is not None:
                r = retention_interval(a, full)
                points.append((ps["retained_fraction"], r["retention"]))
                for b in BASELINES:
                    h = _hits(entry, b, budget)
                    if h is None:
                        continue
                    d = paired_difference({tname: a}, {tname: h}, scale=float(full.mean()))
                    diffs.append(f"{b} {difference_text(d['delta'], d['ci95'], 3)}")
                    summary.append({"model": res["model"], "task": tname, "budget": budget, "baseline": b,
                                    "verdict": d["verdict"], "delta": d["delta"]})
                same_bi = ps["key"] == plans["block-influence"]["key"]
                chance = float(pr["chance"].get(tname, 0.0))
                ro = _hits(entry, "probscale-readout", budget)
                summary.append({"model": res["model"], "task": tname, "budget": budget, "retention": r["retention"],
                                "ci95": r["ci95"], "n": r["n"], "same_as_bi": same_bi, "full": float(full.mean()),
                                "at_chance": float(full.mean()) - chance < 0.05,
                                "readout": None if ro is None else retention_interval(ro, full)["retention"]})
                lines += ["ProbScale minus baseline, retention (95% paired bootstrap, n = "
                          f"{n}; random = mean of 3 seeds per item): " + "; ".join(diffs) + ".",
                          "Plan " + ("equals" if same_bi else "differs from") + " Block Influence's.",
                          *_variant_lines(entry, tname, budget, full), ""]
        fit = fit_scaling(points + [(1.0, 1.0)]) if len(points) >= 2 else None
        if fit is not None:
            x = fit.budget_for(TARGET)
            lines += [f"Scaling fit over ProbScale's fine-tuned plans, retention(x) = a - b x^-c: a={fit.a:.3f}, "
                      f"b={fit.b:.3f}, c={fit.c:.3f}; {TARGET:.0%} predicted at "
                      + (f"{x:.3f} of layer parameters ({1 / x:.1f}x)" if x else "no budget below the full model")
                      + ("" if fit.reliable else f" (unreliable: {'; '.join(fit.warnings or [])})") + ".", ""]
    return lines, summary


def merge_results(files: list[Path]) -> list[dict]:
    """One result per model: the tasks of several runs (one process per task) joined; a run whose recipe differs
    from the first run of its model has it recorded on each of its tasks (``entry["recipe"]``)."""
    merged: dict[str, dict] = {}
    for f in files:
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        have = merged.get(res["model"])
        if have is None:
            merged[res["model"]] = res
            continue
        if any(have[k] != res[k] for k in SETTINGS):  # a task with its own recipe keeps it, and the report says so
            for entry in res["tasks"].values():
                entry["recipe"] = {k: res[k] for k in SETTINGS}
        have["tasks"].update(res["tasks"])
    return list(merged.values())


def write_report(files: list[Path]) -> str:
    lines = ["# ProbScale, task-specific: slimmed then fine-tuned, against every baseline at equal size", "",
             "Written by `bench/bench_probscale_tasks.py --report`. Retention = accuracy of the slimmed model "
             "fine-tuned on the task / accuracy of the full model fine-tuned the same way, on the same test items. "
             "Differences carry 95% paired bootstrap intervals over the test items (2000 resamples); an interval "
             "holding 0 is a tie.", ""]
    summary: list[dict] = []
    for res in merge_results(files):
        sec, summ = model_section(res)
        lines += sec
        summary += summ
    lines += ["## Summary", "", "| model | task | budget | full acc | ProbScale retention [95% CI] | >= 0.95 | "
              "plan = BI | wins | ties | losses | readout-probe ProbScale retention |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in [x for x in summary if "retention" in x]:
        vs = [x for x in summary if "verdict" in x and (x["model"], x["task"], x["budget"]) == (s["model"], s["task"], s["budget"])]
        count = {v: sum(x["verdict"] == v for x in vs) for v in ("better", "tie", "worse")}
        lines.append(f"| {s['model']} | {s['task']} | {s['budget']} | {s['full']:.3f} | {s['retention']:.3f} "
                     f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] (n={s['n']}) | {'n/a: full model at chance' if s['at_chance'] else 'met' if s['retention'] >= TARGET else 'missed'} | "
                     f"{'yes' if s['same_as_bi'] else 'no'} | {count['better']} | {count['tie']} | {count['worse']} | "
                     f"{'-' if s.get('readout') is None else format(s['readout'], '.3f')} |")
    return "\n".join(lines) + "\n"
