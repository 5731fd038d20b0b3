"""Retention against retained parameters: a saturating power law, and the budget it predicts.

``perf(x) = a - b * x ** (-c)`` with ``x`` the retained fraction of transformer-layer parameters
(0 < x <= 1) and ``perf`` the task-weighted retention measured on slimmed models. Inverting it
gives the budget predicted for a target retention: ``x* = (b / (a - target)) ** (1 / c)``.

The fit says when it should not be trusted (:attr:`ScalingFit.warnings`, :attr:`ScalingFit.reliable`):
a fitted parameter on its bound (the optimiser wanted to go further: the form does not fit), measured
points that are not monotone in ``x`` (a drop larger than :data:`MONOTONE_TOL`), or an rmse above
:data:`RMSE_MAX`. Predictions from an unreliable fit are marked so in ``scaling.json`` and the report.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

BOUNDS = ([0.0, 0.0, 1e-2], [2.0, 10.0, 5.0])
RMSE_MAX = 0.02
MONOTONE_TOL = 0.005

@dataclass
class ScalingFit:
    a: float
    b: float
    c: float
    rmse: float
    points: list[tuple[float, float]]
    warnings: list[str] | None = None

    @property
    def reliable(self) -> bool:
        return not self.warnings

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.a - self.b * np.power(x, -self.c)

    def budget_for(self, target: float) -> float | None:
        """Retained fraction predicted to reach ``target`` retention; None when the fit never gets there."""
        if self.b <= 0:
            return min(x for x, _ in self.points) if self.a >= target else None
        if self.a <= target:
            return None
        x = (self.b / (self.a - target)) ** (1.0 / self.c)
        return float(x) if x <= 1.0 + 1e-9 else None

    def to_json(self) -> dict[str, Any]:
        return {"form": "a - b * x^(-c), x = retained fraction of layer parameters",
                "a": self.a, "b": self.b, "c": self.c, "rmse": self.rmse,
                "points": [{"fraction": x, "retention": y} for x, y in self.points],
                "reliable": self.reliable, "warnings": list(self.warnings or [])}


def fit_scaling(points: list[tuple[float, float]]) -> ScalingFit | None:
    """Least-squares fit (scipy ``curve_fit``) of the saturating power law; None with < 3 distinct points."""
    from scipy.optimize import curve_fit

    pts = sorted((float(x), float(y)) for x, y in points if x > 0 and math.isfinite(y))
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    if len(np.unique(xs)) < 3:
        return None

    def f(x, a, b, c):
        return a - b * np.power(x, -c)

    best = None
    for c0 in (0.5, 1.0, 2.0):
        p0 = (float(ys.max()), max(float(ys.max() - ys.min()), 1e-3) * xs.min() ** c0, c0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                popt, _ = curve_fit(f, xs, ys, p0=p0, bounds=BOUNDS, maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        rmse = float(np.sqrt(np.mean((f(xs, *popt) - ys) ** 2)))
        if best is None or rmse < best[1]:
            best = (popt, rmse)
    if best is None:
        return None
    (a, b, c), rmse = best
    return ScalingFit(float(a), float(b), float(c), rmse, pts, fit_warnings((a, b, c), rmse, pts))


def fit_warnings(params: tuple[float, float, float], rmse: float, pts: list[tuple[float, float]]) -> list[str]:
    """Why a fit should not be trusted (empty: no reason found)."""
    out = []
    for name, v, lo, hi in zip("abc", params, *BOUNDS):
        tol = 1e-3 * (hi - lo)
        if v <= lo + tol or v >= hi - tol:
            out.append(f"fitted {name}={v:.4g} sits on its bound [{lo:g}, {hi:g}]")
    ys = [y for _, y in sorted(pts)]
    drops = [(pts[i][0], ys[i] - ys[i + 1]) for i in range(len(ys) - 1) if ys[i] - ys[i + 1] > MONOTONE_TOL]
    if drops:
        out.append(f"measured retention is not monotone in the kept fraction ({len(drops)} drop(s), largest "
                   f"{max(d for _, d in drops):.3f})")
    if rmse > RMSE_MAX:
        out.append(f"rmse {rmse:.3f} is above {RMSE_MAX}")
    return out
