"""PNG plots of the probe matrix and of the scaling fit (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .probes import ProbeMatrix
from .scaling import ScalingFit


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_probe_matrix(pm: ProbeMatrix, path: Path, relevance: dict[str, np.ndarray] | None = None,
                      keep: dict[str, list[int]] | None = None, title: str = "") -> None:
    """Heatmap of P[layer, task] (plus the weighted column) per stack, with the relevance per layer
    as bars beside it; kept layers are starred."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    stacks = list(pm.accuracy)
    rows = max(v.shape[0] for v in pm.accuracy.values())
    ncols = len(stacks) * (2 if relevance is not None else 1)
    widths = [1.0 * (len(pm.tasks) + 1), 1.6] * len(stacks) if relevance is not None else None
    fig, axes = plt.subplots(1, ncols, figsize=(1.2 + sum(widths or [len(pm.tasks) + 1]) * 0.95 + 1.0,
                                                1.6 + 0.24 * rows),
                             squeeze=False, gridspec_kw={"width_ratios": widths} if widths else None)
    for k, s in enumerate(stacks):
        ax = axes[0][k * (2 if relevance is not None else 1)]
        data = np.column_stack([pm.accuracy[s], pm.weighted(s)])
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=min(0.0, float(data.min())), vmax=1.0)
        ax.set_xticks(range(data.shape[1]), pm.tasks + ["weighted"], rotation=45, ha="right")
        kept = set(keep.get(s, [])) if keep else set()
        labels = ["emb"] + [f"{i}{' *' if i in kept else ''}" for i in range(data.shape[0] - 1)]
        ax.set_yticks(range(data.shape[0]), labels, fontsize=7)
        ax.set_ylabel(f"{s}: output of layer (* kept)" if keep else f"{s}: output of layer")
        if data.size <= 600:
            for r in range(data.shape[0]):
                for c in range(data.shape[1]):
                    ax.text(c, r, f"{data[r, c]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if data[r, c] < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.06, pad=0.02, label="probe accuracy")
        if relevance is not None and s in relevance:
            axr = axes[0][k * 2 + 1]
            rel = np.asarray(relevance[s])
            colors = ["tab:blue" if i in kept else "lightgrey" for i in range(len(rel))]
            axr.barh(np.arange(1, len(rel) + 1), rel, color=colors, height=0.8)
            axr.axvline(0, color="k", lw=0.6)
            axr.set_ylim(data.shape[0] - 0.5, -0.5)
            axr.set_yticks([])
            axr.set_xlabel("relevance\n(blue: kept)", fontsize=8)
            axr.xaxis.set_major_locator(MaxNLocator(nbins=3))  # a narrow axis: few ticks, labels upright
            axr.tick_params(axis="x", labelsize=7, labelrotation=90)
    fig.suptitle(title or "probe accuracy P[layer, task]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(fit: ScalingFit | None, points: list[dict[str, Any]], path: Path, *,
                 checks: list[dict[str, Any]] | None = None, compare: dict[str, dict[str, Any]] | None = None,
                 title: str = "") -> None:
    """Measured retention against retained layer parameters, the fitted curve and the checks."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [p["fraction"] for p in points]
    ys = [p["retention"] for p in points]
    ax.plot(xs, ys, "o", color="tab:blue", label="ProbScale, measured (label: layers kept)")
    for p in points:
        if p.get("keep"):
            ax.annotate(f"{sum(len(k) for k in p['keep'].values())}L", (p["fraction"], p["retention"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=6, color="tab:blue")
    if fit is not None:
        grid = np.linspace(max(min(xs) * 0.8, 0.02), 1.0, 200)
        ax.plot(grid, fit(grid), "-" if fit.reliable else "--", color="tab:blue", alpha=0.6,
                label=f"fit {fit.a:.3f} - {fit.b:.3f} x^-{fit.c:.2f}" + ("" if fit.reliable else " (UNRELIABLE)"))
    for chk in checks or []:
        if chk.get("measured_retention") is None:
            continue
        ax.plot([chk["fraction"]], [chk["measured_retention"]], "*", ms=12,
                label=f"check {chk['target']:.0%}: measured {chk['measured_retention']:.3f}"
                + ("" if chk.get("reliable", True) else " (fit unreliable)"))
        ax.axhline(chk["target"], color="grey", lw=0.6, ls=":")
    markers = {"probscale-contiguous": "D", "probscale-free": "s", "block-influence": "v", "angular": "<",
               "last-layers": "^", "random": "x"}
    shown = [(n, m) for n, m in (compare or {}).items() if m.get("retention") is not None]
    span = max(xs + [m["fraction"] for _, m in shown]) - min(xs + [m["fraction"] for _, m in shown]) or 1.0
    for i, (name, m) in enumerate(shown):
        # methods compared at one size share x: dodge them sideways so no marker hides another
        x = m["fraction"] + (i - (len(shown) - 1) / 2) * 0.015 * span
        ax.plot([x], [m["retention"]], markers.get(name, "d"), label=name)
        layers = sum(len(k) for k in m.get("keep", {}).values())
        if layers:
            ax.annotate(f"{layers}L", (x, m["retention"]), textcoords="offset points", xytext=(0, -10),
                        ha="center", fontsize=6)
    ax.set_xlabel("retained fraction of transformer-layer parameters")
    ax.set_ylabel("task-weighted retention")
    ax.set_title(title or "retention vs retained parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
