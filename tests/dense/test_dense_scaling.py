"""The saturating power-law fit and the budget it predicts."""

from __future__ import annotations

import numpy as np
import pytest

from moe_slim.dense.scaling import fit_scaling


def test_fit_recovers_a_power_law_and_inverts_it():
    xs = [0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0]
    truth = lambda x: 1.02 - 0.05 * x ** -1.2  # noqa: E731
    fit = fit_scaling([(x, truth(x)) for x in xs])
    assert fit is not None and fit.rmse < 1e-4
    assert (fit.a, fit.b, fit.c) == pytest.approx((1.02, 0.05, 1.2), rel=1e-2)
    x95 = fit.budget_for(0.95)
    assert truth(x95) == pytest.approx(0.95, abs=1e-3)
    assert fit.budget_for(1.5) is None  # above the asymptote: never reached
    assert fit.to_json()["points"][0] == {"fraction": 0.1, "retention": truth(0.1)}
    assert fit.reliable and fit.warnings == []


def test_fit_needs_three_budgets_and_survives_flat_data():
    assert fit_scaling([(0.5, 0.9), (1.0, 1.0)]) is None
    flat = fit_scaling([(0.2, 1.05), (0.4, 1.06), (0.6, 1.05), (1.0, 1.0)])
    assert flat is not None and np.isfinite(flat.rmse)
    x = flat.budget_for(0.95)
    assert x is None or 0 <= x <= 1


def test_fit_says_when_it_is_unreliable():
    # non-monotone points (the reported case): flagged, whatever the optimiser does
    bumpy = fit_scaling([(0.1, 0.7), (0.2, 1.05), (0.3, 0.9), (0.5, 1.08), (1.0, 1.0)])
    assert bumpy is not None and not bumpy.reliable
    assert any("not monotone" in w for w in bumpy.warnings)
    assert bumpy.to_json()["reliable"] is False
    # a steep cliff the form cannot follow: a parameter is pinned to its bound or the rmse is high
    cliff = fit_scaling([(0.1, 0.0), (0.2, 0.0), (0.3, 0.0), (0.4, 1.0), (1.0, 1.0)])
    assert cliff is not None and not cliff.reliable
    assert any("bound" in w or "rmse" in w for w in cliff.warnings)
