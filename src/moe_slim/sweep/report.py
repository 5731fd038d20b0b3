"""Reports of a sweep: Pareto fronts, tables, and the best configuration for a stated target.

    >>> info = write_report("runs/sweep-demo/results.db", out="runs/sweep-demo/report",
    ...                     target="chrf>=0.98*baseline")

Two fronts are drawn (PNG, matplotlib with the Agg backend):

* ``params_vs_chrf.png``: retained parameters (share of the baseline) against chrF, one front per
  method (fewer parameters and higher chrF are better);
* ``mc_vs_generative.png``: mean multiple-choice accuracy against the generative score (chrF, or
  math exact match when the sweep has no translation), one front per calibration mix.

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
from .targets import (
    baseline_row,
    best_for_target,
    command_for,
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


def table(rows: list[dict[str, Any]]) -> str:
    """The headline table (Markdown), baseline first, then by mix, method and ratio."""
    base = baseline_row(rows)
    bp = base["params"] if base else None
    lines = ["| method | mix | ratio | budget | experts kept | params (share) | chrF | MC acc | math EM | ppl | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (r["kind"] != "baseline", r["mix"], r["method"], r["ratio"], r["budget"]))
    for r in order:
        share = f"{r['params']:,} ({r['params'] / bp:.2f})" if bp else f"{r['params']:,}"
        secs = (r.get("timings") or {}).get("total_s")
        lines.append(f"| {r['method']} | {r['mix']} | {r['ratio']:g} | {r['budget']} | {r['experts_kept']}/"
                     f"{r['experts_total']} | {share} | {_fmt(r['chrf'], 2)} | {_fmt(r['mc_acc'])} | "
                     f"{_fmt(r['math_em'])} | {_fmt(r['ppl'], 2)} | {_fmt(secs, 1)} |")
    return "\n".join(lines)


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
    """Pareto fronts: params share vs chrF per method; MC accuracy vs generative score per mix."""
    base = baseline_row(rows)
    bp = base["params"] if base else max((r["params"] for r in rows), default=1)
    by_method: dict[str, list[dict[str, Any]]] = {}
    by_mix: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "baseline":
            continue
        by_method.setdefault(r["method"], []).append(r)
        by_mix.setdefault(r["mix"], []).append(r)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {"params_vs_chrf": {}, "mc_vs_generative": {}}
    for m, rs in by_method.items():
        pts = [(r["params"] / bp, r["chrf"]) for r in rs]
        out["params_vs_chrf"][m] = [rs[i] for i in pareto_front(pts, (False, True))]
    for m, rs in by_mix.items():
        pts = [(r["mc_acc"], r["gen_score"]) for r in rs]
        out["mc_vs_generative"][m] = [rs[i] for i in pareto_front(pts, (True, True))]
    return out


def _plot(rows: list[dict[str, Any]], fr: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline_row(rows)
    bp = base["params"] if base else max(r["params"] for r in rows)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, front) in enumerate(sorted(fr["params_vs_chrf"].items())):
        color = f"C{i % 10}"
        pts = [r for r in rows if r["method"] == method and r["chrf"] is not None]
        ax.scatter([r["params"] / bp for r in pts], [r["chrf"] for r in pts], color=color, alpha=0.35, s=14)
        ax.plot([r["params"] / bp for r in front], [r["chrf"] for r in front], "-o", color=color, label=method, ms=4)
    if base and base["chrf"] is not None:
        ax.scatter([1.0], [base["chrf"]], marker="*", s=120, color="k", label="baseline", zorder=5)
    written.append(_finish_plot(fig, ax, out / "params_vs_chrf.png", "retained parameters (share of baseline)",
                                "chrF", "Pareto fronts per method: parameters vs chrF", legend_size=8))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    gen_name = "chrF" if any(r["chrf"] is not None for r in rows) else "math exact match"
    for i, (mix, front) in enumerate(sorted(fr["mc_vs_generative"].items())):
        color = f"C{i % 10}"
        pts = [r for r in rows if r["mix"] == mix and r["mc_acc"] is not None and r["gen_score"] is not None]
        ax.scatter([r["mc_acc"] for r in pts], [r["gen_score"] for r in pts], color=color, alpha=0.35, s=14)
        ax.plot([r["mc_acc"] for r in front], [r["gen_score"] for r in front], "-o", color=color, label=mix, ms=4)
    if base and base["mc_acc"] is not None and base["gen_score"] is not None:
        ax.scatter([base["mc_acc"]], [base["gen_score"]], marker="*", s=120, color="k", label="baseline", zorder=5)
    written.append(_finish_plot(fig, ax, out / "mc_vs_generative.png", "multiple-choice accuracy (mean over tasks)",
                                gen_name, "Pareto fronts per calibration mix: multiple choice vs generative",
                                legend_size=7))
    return written


def _finish_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, *, legend_size: int) -> str:
    """Label, save and close one front plot; returns the file name."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(db: str | os.PathLike, out: str | os.PathLike | None = None, *, target: str | None = None,
                 plots: bool = True) -> dict[str, Any]:
    """Write ``report.md`` and the front PNGs for a results DB; return paths, the table and the best point."""
    from ..outputs import atomic_dir, refuse_overlap
    from .store import read_rows

    if target is not None:
        parse_target(target)
    rows, meta = read_rows(db)
    if not rows:
        raise MoeSlimError(f"{db} holds no results yet (run the sweep)")
    dbp = Path(db)
    out = Path(out) if out is not None else (dbp if dbp.is_dir() else dbp.parent) / "report"
    refuse_overlap(out, [dbp / "results.db" if dbp.is_dir() else dbp])
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
    md += ["## Pareto front per method: retained parameters vs chrF", "", "![params vs chrF](params_vs_chrf.png)", ""]
    for method, front in sorted(fr["params_vs_chrf"].items()):
        md.append(f"- **{method}**: " + ", ".join(f"{r['mix']} @{r['ratio']:g} (chrF {_fmt(r['chrf'], 2)})"
                                                     for r in front))
    md += ["", "## Pareto front per mix: multiple choice vs generative", "",
           "![MC vs generative](mc_vs_generative.png)", ""]
    for mix, front in sorted(fr["mc_vs_generative"].items()):
        md.append(f"- **{mix}**: " + ", ".join(f"{r['method']} @{r['ratio']:g} (MC {_fmt(r['mc_acc'])}, "
                                                  f"gen {_fmt(r['gen_score'], 2)})" for r in front))
    command = None
    if target:
        md += ["", f"## Best configuration for `{target}`", ""]
        if best is None:
            md.append("No point meets the target.")
        else:
            command = command_for(best, meta)
            md += [f"{best['method']} ({best['kind']}), ratio {best['ratio']:g}, budget {best['budget']}, mix "
                   f"{best['mix']}: {best['experts_kept']}/{best['experts_total']} experts, {best['params']:,} "
                   f"parameters, chrF {_fmt(best['chrf'], 2)} (threshold {best['target_threshold']:.3f}).", "",
                   "Write its checkpoint with:", "", "```bash", command, "```"]
        if best_any is not None and (best is None or best_any["key"] != best["key"]):
            md += ["", f"In memory only (different expert counts per layer, not writable as a checkpoint): "
                   f"{best_any['method']} ratio {best_any['ratio']:g}, budget {best_any['budget']}, mix "
                   f"{best_any['mix']}: {best_any['experts_kept']}/{best_any['experts_total']} experts."]
    with atomic_dir(out, overwrite=True) as tmp:
        pngs = _plot(rows, fr, tmp) if plots else []
        (tmp / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return {"out": str(out), "report": str(out / "report.md"), "plots": [str(out / p) for p in pngs],
            "table": table(rows), "best": best, "command": command, "fronts": fr}
