"""Reports of a sweep: Pareto fronts, tables, and the best configuration for a stated target.

    >>> info = write_report("runs/sweep-demo/results.db", out="runs/sweep-demo/report",
    ...                     target="chrf>=0.98*baseline")

Two fronts are drawn (PNG, matplotlib with the Agg backend):

* ``params_vs_chrf.png``: retained parameters (share of the baseline) against chrF, one front per
  method and calibration mix (fewer parameters and higher chrF are better);
* ``mc_vs_generative.png``: mean multiple-choice accuracy against the generative score (chrF, or
  math exact match when the sweep has no translation), one front per calibration mix.

The report also pairs every merge point with every prune point at the same ratio and mix: chrF
difference on the same sentences with its paired-bootstrap interval (:mod:`.paired`).

A target is ``METRIC OP VALUE`` where METRIC is a headline column (``chrf``, ``mc_acc``,
``math_em``, ``ppl``, ``gen_score``) or a metric key (``translation/chrf``), OP is ``>=`` or ``<=``
and VALUE a number or ``F*baseline`` (the unpruned row's value times F). The best point meets the
target with the fewest experts kept (then the fewest parameters, then the best metric).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import MoeSlimError
from .paired import prune_vs_merge
from .plots import mc_vs_generative, params_vs_chrf, save, series_name
from .targets import (
    baseline_row,
    best_for_target,
    command_for,
    delta_interval,
    interval,
    metric_value,
    parse_target,
)


def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (False, True)) -> list[int]:
    """Indices of the non-dominated points, sorted by the first coordinate.

    ``maximize`` says per coordinate whether larger is better (default: minimise x, maximise y).
    A point is dominated when another is at least as good in both and better in one; exact
    duplicates are kept once (the first).
    """
    def better_eq(a: float, b: float, mx: bool) -> bool:
        return a >= b if mx else a <= b

    keep: list[int] = []
    for i, p in enumerate(points):
        if any(v is None or v != v for v in p):
            continue
        dominated = False
        for j, q in enumerate(points):
            if i == j or any(v is None or v != v for v in q):
                continue
            ge = all(better_eq(q[k], p[k], maximize[k]) for k in range(2))
            strict = any(q[k] != p[k] for k in range(2))
            if ge and (strict or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _n(row: dict[str, Any], key: str) -> str:
    v = (row.get("metrics") or {}).get(key)
    return f" (n={int(v)})" if isinstance(v, (int, float)) else ""


def _mc_n(row: dict[str, Any]) -> str:
    m = row.get("metrics") or {}
    ns = [int(v) for k, v in m.items() if k.endswith("/n") and k.count("/") == 1 and f"{k[:-2]}/acc" in m]
    return f" (n={sum(ns)})" if ns else ""


def _ci(ci: tuple[float, float] | None, nd: int = 2, signed: bool = False) -> str:
    if ci is None:
        return ""
    f = f"{{:+.{nd}f}}" if signed else f"{{:.{nd}f}}"
    return f" [{f.format(ci[0])}, {f.format(ci[1])}]"


def delta_cell(row: dict[str, Any]) -> str:
    """chrF minus the baseline's, with its 95% paired-bootstrap interval; '~' marks a tie (interval spans 0)."""
    d, ci = metric_value(row, "translation/chrf_delta_vs_baseline"), delta_interval(row, "chrf")
    if d is None:
        return "-"
    tie = ci is not None and ci[0] <= 0 <= ci[1]
    return f"{'~' if tie else ''}{d:+.2f}{_ci(ci, 2, signed=True)}"


def table(rows: list[dict[str, Any]]) -> str:
    """The headline table (Markdown), baseline first, then by mix, method and ratio; every score with its n,
    chrF with its 95% interval and its difference from the baseline (paired bootstrap)."""
    base = baseline_row(rows)
    bp = base["params"] if base else None
    lines = ["| method | mix | ratio | budget | experts kept | params (share) | chrF [95% CI] | Δ chrF vs baseline "
             "[95% CI] | MC acc [95% CI] | math EM | ppl | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (r["kind"] != "baseline", r["mix"], r["method"], r["ratio"], r["budget"]))
    for r in order:
        share = f"{r['params']:,} ({r['params'] / bp:.2f})" if bp else f"{r['params']:,}"
        secs = (r.get("timings") or {}).get("total_s")
        lines.append(f"| {r['method']} | {r['mix']} | {r['ratio']:g} | {r['budget']} | {r['experts_kept']}/"
                     f"{r['experts_total']} | {share} | {_fmt(r['chrf'], 2)}{_ci(interval(r, 'chrf'))}"
                     f"{_n(r, 'translation/n')} | {delta_cell(r)} | {_fmt(r['mc_acc'])}{_ci(interval(r, 'mc_acc'), 3)}"
                     f"{_mc_n(r)} | {_fmt(r['math_em'])}{_n(r, 'math_gen/n')} | {_fmt(r['ppl'], 2)}"
                     f"{_n(r, 'perplexity/tokens').replace('n=', 'tokens=')} | {_fmt(secs, 1)} |")
    notes = ["", "Intervals: chrF and its difference from the baseline by a paired bootstrap over the same "
             "sentences (1000 resamples); '~' marks a difference whose interval contains 0 (a tie, not a loss or "
             "a win). MC accuracy: normal approximation over the items of each task."]
    if any((r.get("metrics") or {}).get("before_sft/translation/chrf") is not None for r in rows):
        notes.append("Points were healed with SFT; 'before SFT' scores are in the per-point metrics (before_sft/...).")
    return "\n".join(lines + notes)


def pivot(rows: list[dict[str, Any]], metric: str = "chrf", nd: int = 2) -> str:
    """``metric`` per method and mix (rows) and ratio (columns), Markdown; the baseline on top."""
    base = baseline_row(rows)
    ratios = sorted({r["ratio"] for r in rows if r["kind"] != "baseline"})
    lines = ["| method | mix | " + " | ".join(f"{metric} @{int(round(x * 100))}% removed" for x in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    if base:
        lines.append("| baseline | - | " + " | ".join(_fmt(metric_value(base, metric), nd) for _ in ratios) + " |")
    cells: dict[tuple[str, str], dict[float, Any]] = {}
    for r in rows:
        if r["kind"] != "baseline":
            cells.setdefault((r["method"], r["mix"] + ("" if r["budget"] == "uniform" else f" ({r['budget']})")),
                             {})[r["ratio"]] = metric_value(r, metric)
    for (method, mix), vals in sorted(cells.items()):
        lines.append(f"| {method} | {mix} | " + " | ".join(_fmt(vals.get(x), nd) for x in ratios) + " |")
    return "\n".join(lines)


def fronts(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Pareto fronts: params share vs chrF per method and calibration mix; MC accuracy vs generative score
    per mix."""
    base = baseline_row(rows)
    bp = base["params"] if base else max((r["params"] for r in rows), default=1)
    by_method: dict[str, list[dict[str, Any]]] = {}
    by_mix: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "baseline":
            continue
        by_method.setdefault(series_name(r), []).append(r)
        by_mix.setdefault(r["mix"], []).append(r)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {"params_vs_chrf": {}, "mc_vs_generative": {}}
    for m, rs in by_method.items():
        pts = [(r["params"] / bp, r["chrf"]) for r in rs]
        out["params_vs_chrf"][m] = [rs[i] for i in pareto_front(pts, (False, True))]
    for m, rs in by_mix.items():
        pts = [(r["mc_acc"], r["gen_score"]) for r in rs]
        out["mc_vs_generative"][m] = [rs[i] for i in pareto_front(pts, (True, True))]
    return out


def target_line(best: dict[str, Any]) -> str:
    """The targeted metric of the best point, with its interval, n and the threshold it clears."""
    metric = best["target_metric"]
    v = metric_value(best, metric)
    text = f"{metric} {_fmt(v, 3)}"
    if metric in ("chrf", "translation/chrf"):
        text += f"{_ci(interval(best, 'chrf'))}{_n(best, 'translation/n')}, vs baseline {delta_cell(best)}"
    elif metric == "mc_acc":
        text += f"{_ci(interval(best, 'mc_acc'), 3)}{_mc_n(best)}"
    return f"{text}; threshold {best['target_threshold']:.3f} (decided on the {best['basis']})"


def write_report(db: str | os.PathLike, out: str | os.PathLike | None = None, *, target: str | None = None,
                 plots: bool = True, overwrite: bool | None = None) -> dict[str, Any]:
    """Write ``report.md`` and the front PNGs for a results DB; return paths, the table and the best point.

    An existing report is replaced only with ``overwrite``, which defaults to True for the default place
    (``report/`` in the sweep directory, rewritten as the sweep grows) and False for an ``out`` given;
    either way only a previous report is replaced (:mod:`moe_slim.outputs`)."""
    from ..outputs import atomic_dir, check_output
    from .store import read_rows

    if target is not None:
        parse_target(target)
    dbp = Path(db)
    if overwrite is None:
        overwrite = out is None
    out = Path(out) if out is not None else (dbp if dbp.is_dir() else dbp.parent) / "report"
    check_output(out, overwrite, [dbp / "results.db" if dbp.is_dir() else dbp], kind="report")
    rows, meta = read_rows(db)
    if not rows:
        raise MoeSlimError(f"{db} holds no results yet (run the sweep)")
    fr = fronts(rows)
    best = best_for_target(rows, target, writable_only=True) if target else None
    best_any = best_for_target(rows, target) if target else None
    md = [f"# Sweep report: {meta.get('name', '')}", "",
          f"Model `{meta.get('model')}`; statistics `{meta.get('stats_dir')}`; {len(rows)} points"
          + (f" ({meta['stale_rows']} rows of earlier sweeps or models in the database are not shown)"
             if meta.get("stale_rows") else "") + ".", "",
          "## chrF by method, mix and ratio", "", pivot(rows, "chrf"), "",
          "## Mean multiple-choice accuracy by method, mix and ratio", "", pivot(rows, "mc_acc", 3), "",
          "## All points", "", table(rows), ""]
    md += ["## Pareto front per method and mix: retained parameters vs chrF", "",
           "![params vs chrF](params_vs_chrf.png)", ""]
    for name, front in sorted(fr["params_vs_chrf"].items()):
        md.append(f"- **{name}**: " + ", ".join(f"@{r['ratio']:g} (chrF {_fmt(r['chrf'], 2)})" for r in front))
    md += ["", *prune_vs_merge(db, rows, meta)]
    md += ["", "## Pareto front per mix: multiple choice vs generative", "",
           "![MC vs generative](mc_vs_generative.png)", ""]
    for mix, front in sorted(fr["mc_vs_generative"].items()):
        md.append(f"- **{mix}**: " + ", ".join(f"{r['method']} @{r['ratio']:g} (MC {_fmt(r['mc_acc'])}, "
                                                  f"gen {_fmt(r['gen_score'], 2)})" for r in front))
    command = None
    if target:
        md += ["", f"## Best configuration for `{target}`", ""]
        if best is None:
            md.append("No point's 95% interval clears the target (a point estimate above it is not enough).")
        else:
            command = command_for(best, meta)
            md += [f"{best['method']} ({best['kind']}), ratio {best['ratio']:g}, budget {best['budget']}, mix "
                   f"{best['mix']}: {best['experts_kept']}/{best['experts_total']} experts, {best['params']:,} "
                   f"parameters; {target_line(best)}.", "",
                   "Write its checkpoint with:", "", "```bash", command, "```"]
        if best_any is not None and (best is None or best_any["key"] != best["key"]):
            md += ["", f"In memory only (different expert counts per layer, not writable as a checkpoint): "
                   f"{best_any['method']} ratio {best_any['ratio']:g}, budget {best_any['budget']}, mix "
                   f"{best_any['mix']}: {best_any['experts_kept']}/{best_any['experts_total']} experts."]
    with atomic_dir(out, overwrite=overwrite, kind="report") as tmp:
        pngs = [save(params_vs_chrf(rows, fr["params_vs_chrf"]), tmp / "params_vs_chrf.png"),
                save(mc_vs_generative(rows, fr["mc_vs_generative"]), tmp / "mc_vs_generative.png")] if plots else []
        (tmp / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return {"out": str(out), "report": str(out / "report.md"), "plots": [str(out / p) for p in pngs],
            "table": table(rows), "best": best, "command": command, "fronts": fr}
