"""The report's two front plots (matplotlib, Agg). Every series (a method and a calibration mix in the
parameters plot, a mix in the other) has its own colour and marker, and series that share an x value
are drawn side by side, a little apart, so their 95% interval bars do not cover each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .targets import baseline_row, interval

MARKERS = "osD^vP*Xh<>"
#: the horizontal spread of series at one x, as a share of the x axis's range
SPREAD = 0.025


def series_style(i: int) -> tuple[str, str]:
    """Colour and marker of the i-th series: matplotlib's 20 tab20 colours, the strong ten first."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colors = colormaps["tab20"].colors
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return to_hex(colors[order[i % 20]]), MARKERS[i % len(MARKERS)]


def offsets(n: int, span: float) -> list[float]:
    """``n`` x offsets centred on 0 and ``span * SPREAD`` apart."""
    return [(k - (n - 1) / 2) * span * SPREAD for k in range(n)]


def _n_of(row: dict[str, Any] | None, key: str) -> int | None:
    v = ((row or {}).get("metrics") or {}).get(key)
    return int(v) if isinstance(v, (int, float)) else None


def _mc_items(row: dict[str, Any] | None) -> int | None:
    m = (row or {}).get("metrics") or {}
    ns = [int(v) for k, v in m.items() if k.endswith("/n") and k.count("/") == 1 and f"{k[:-2]}/acc" in m]
    return sum(ns) if ns else None


def params_vs_chrf(rows: list[dict[str, Any]], fronts: dict[str, list[dict[str, Any]]]) -> Any:
    """Retained parameters against chrF: one series and front per method and mix; the baseline as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline_row(rows)
    bp = base["params"] if base else max(r["params"] for r in rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = sorted(fronts)
    shifts = offsets(len(names), 1.0)
    for i, name in enumerate(names):
        color, marker = series_style(i)
        pts = [r for r in rows if series_name(r) == name and r["chrf"] is not None]
        xs = [r["params"] / bp + shifts[i] for r in pts]
        ax.scatter(xs, [r["chrf"] for r in pts], color=color, marker=marker, alpha=0.35, s=16)
        _bars(ax, xs, pts, "chrf", color)
        front = fronts[name]
        ax.plot([r["params"] / bp + shifts[i] for r in front], [r["chrf"] for r in front], "-", marker=marker,
                color=color, label=name, ms=4)
    if base and base["chrf"] is not None:
        ax.scatter([1.0], [base["chrf"]], marker="*", s=120, color="k", label="baseline", zorder=5)
    n = _n_of(base or rows[0], "translation/n")
    _finish(ax, "retained parameters (share of baseline; series drawn side by side)",
            f"chrF (n = {n} sentences; bars: 95% CI)" if n else "chrF",
            "Pareto fronts per method and mix: parameters vs chrF", legend_size=7)
    return fig


def mc_vs_generative(rows: list[dict[str, Any]], fronts: dict[str, list[dict[str, Any]]]) -> Any:
    """Mean multiple-choice accuracy against the generative score, one series and front per mix, with the
    95% intervals of both (chrF's from the paired bootstrap) and their n on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline_row(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    chrf = any(r["chrf"] is not None for r in rows)
    names = sorted(fronts)
    for i, mix in enumerate(names):
        color, marker = series_style(i)
        pts = [r for r in rows if r["kind"] != "baseline" and r["mix"] == mix and r["mc_acc"] is not None
               and r["gen_score"] is not None]
        xs, ys = [r["mc_acc"] for r in pts], [r["gen_score"] for r in pts]
        ax.scatter(xs, ys, color=color, marker=marker, alpha=0.35, s=16)
        _bars(ax, ys, pts, "mc_acc", color, vertical=False)
        if chrf:
            _bars(ax, xs, pts, "chrf", color)
        front = fronts[mix]
        ax.plot([r["mc_acc"] for r in front], [r["gen_score"] for r in front], "-", marker=marker, color=color,
                label=mix, ms=4)
    if base and base["mc_acc"] is not None and base["gen_score"] is not None:
        ax.scatter([base["mc_acc"]], [base["gen_score"]], marker="*", s=120, color="k", label="baseline", zorder=5)
    n_mc = _mc_items(base or rows[0])
    n_tr = _n_of(base or rows[0], "translation/n" if chrf else "math_gen/n")
    gen = "chrF" if chrf else "math exact match"
    _finish(ax, "multiple-choice accuracy (mean over tasks" + (f"; n = {n_mc} items" if n_mc else "")
            + "; bars: 95% CI)", f"{gen} (n = {n_tr}" + ("; bars: 95% CI)" if chrf else ")") if n_tr else gen,
            "Pareto fronts per calibration mix: multiple choice vs generative", legend_size=7)
    return fig


def series_name(row: dict[str, Any]) -> str:
    """The parameters plot's series of a point: its method and calibration mix."""
    return f"{row['method']} · {row['mix']}"


def _bars(ax: Any, other: list[float], pts: list[dict[str, Any]], metric: str, color: str, *,
          vertical: bool = True) -> None:
    """95% interval bars of ``metric`` at the points (vertical: the metric is on the y axis)."""
    for o, r in zip(other, pts):
        ci = interval(r, metric)
        if ci is not None:
            ax.plot([o, o] if vertical else list(ci), list(ci) if vertical else [o, o], color=color, alpha=0.5, lw=1)


def _finish(ax: Any, xlabel: str, ylabel: str, title: str, *, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    ax.figure.tight_layout()


def save(fig: Any, path: Path) -> str:
    """Write and close one figure; returns the file name."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
