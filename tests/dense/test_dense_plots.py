"""The probe-matrix figure: the relevance bar's tick labels stay readable (no two overlap), whatever the
relevance values' magnitudes."""

from __future__ import annotations

import itertools

import matplotlib.figure
import numpy as np
import pytest

from moe_slim.dense.plots import plot_probe_matrix
from moe_slim.dense.probes import ProbeMatrix


@pytest.mark.parametrize("scale", [1e-3, 12.0])
def test_relevance_tick_labels_do_not_overlap(tmp_path, monkeypatch, scale: float) -> None:
    layers, tasks = 12, ["pairmatch-hard", "codeline", "mathanswer", "cloze"]
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.3, 0.9, size=(layers + 1, len(tasks)))
    pm = ProbeMatrix(tasks=tasks, weights={t: 1.0 for t in tasks}, accuracy={"layers": acc},
                     skill={"layers": acc}, chance={t: 0.25 for t in tasks})
    relevance = {"layers": rng.uniform(-0.2, 1.0, size=layers) * scale}
    saved = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k)))
    plot_probe_matrix(pm, tmp_path / "m.png", relevance, {"layers": [0, 1, 2, 3, 4, 5]})
    (fig,) = saved
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    axr = fig.axes[1]  # the relevance bars beside the heatmap
    boxes = [t.get_window_extent(renderer) for t in axr.get_xticklabels() if t.get_visible() and t.get_text()]
    assert len(boxes) >= 2
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
