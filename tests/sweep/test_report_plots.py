"""The report's plots and its prune-vs-merge pairing, on hand-made points: each method x mix series has
its own colour, series at one x are drawn apart so their interval bars do not overlap, the generative
axis carries intervals and n, and merge and prune points at one ratio are paired on the same sentences."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from eval_fixtures import write_fixture_data

from moe_slim.evals.data import data_file, read_jsonl
from moe_slim.evals.translation import paired_bootstrap
from moe_slim.sweep.paired import prune_vs_merge
from moe_slim.sweep.plots import mc_vs_generative, params_vs_chrf
from moe_slim.sweep.report import fronts
from moe_slim.sweep.store import open_db


def _row(kind, method, mix, ratio, chrf, key=None):
    m = {"translation/chrf": chrf, "translation/n": 90, "translation/chrf_lo": chrf - 1.5,
         "translation/chrf_hi": chrf + 1.5, "translation_choice/acc": 0.4, "translation_choice/n": 30}
    return {"key": key or f"{method}-{mix}-{ratio}", "kind": kind, "method": method, "mix": mix, "ratio": ratio,
            "budget": "uniform", "params": int(1000 * (1 - ratio / 2)), "chrf": chrf, "mc_acc": 0.4,
            "math_em": None, "ppl": None, "gen_score": chrf, "metrics": m, "experts_kept": 4, "experts_total": 8}


ROWS = [_row("baseline", "none", "-", 0.0, 30.0)] + [
    _row("prune", method, mix, ratio, 25.0 - 10 * ratio + (1 if mix == "translation" else 0))
    for method in ("reap", "frequency") for mix in ("translation", "general") for ratio in (0.25, 0.5)]


def _bars(ax):
    """Vertical two-point lines (the interval bars): (colour, x) each."""
    return [(l.get_color(), l.get_xdata()[0]) for l in ax.get_lines()
            if len(l.get_xdata()) == 2 and l.get_xdata()[0] == l.get_xdata()[1]]


def test_every_method_and_mix_has_its_colour_and_bars_at_one_ratio_stand_apart() -> None:
    fr = fronts(ROWS)
    fig = params_vs_chrf(ROWS, fr["params_vs_chrf"])
    ax = fig.axes[0]
    series = {t.get_text() for t in ax.get_legend().get_texts()} - {"baseline"}
    assert series == {f"{m} · {x}" for m in ("reap", "frequency") for x in ("translation", "general")}
    colours = {l.get_label(): l.get_color() for l in ax.get_lines() if l.get_label() in series}
    assert len(set(colours.values())) == 4, colours
    bars = _bars(ax)
    assert len(bars) == 8 and len({x for _, x in bars}) == 8, "no two interval bars share an x"
    assert "n = 90 sentences" in ax.get_ylabel()
    plt.close(fig)


def test_mc_vs_generative_shows_chrf_intervals_and_n() -> None:
    fig = mc_vs_generative(ROWS, fronts(ROWS)["mc_vs_generative"])
    ax = fig.axes[0]
    assert "n = 90" in ax.get_ylabel() and "95% CI" in ax.get_ylabel() and "n = 30 items" in ax.get_xlabel()
    assert len(_bars(ax)) == 8  # a chrF interval at every point
    plt.close(fig)


def test_report_pairs_merge_and_prune_at_equal_ratio(tmp_path) -> None:
    data = write_fixture_data(tmp_path / "data", n_per_domain=5)
    recs = list(read_jsonl(data_file(data, "translation", "test")))
    refs = {str(r["id"]): str(r["ref"]) for r in recs}
    merge_h = {i: ref for i, ref in refs.items()}  # the merge point translates perfectly ...
    prune_h = {i: "x" for i in refs}  # ... the prune point does not
    rows = [_row("merge", "hc-smoe", "translation", 0.5, 100.0), _row("prune", "reap", "translation", 0.5, 1.0),
            _row("prune", "reap", "translation", 0.25, 1.0)]
    db = tmp_path / "results.db"
    conn = open_db(db)
    for r, h in zip(rows, (merge_h, prune_h, prune_h)):
        conn.execute("INSERT INTO hypotheses (key, data) VALUES (?, ?)", (r["key"], json.dumps(h)))
    conn.commit()
    lines = prune_vs_merge(db, rows, {"data_dir": str(data), "spec": {"eval": {}}})
    (row,) = [l for l in lines if l.startswith("| translation |")]  # the 0.25 prune point has no merge beside it
    ids = [str(r["id"]) for r in recs]
    want = paired_bootstrap([merge_h[i] for i in ids], [prune_h[i] for i in ids], [refs[i] for i in ids],
                            metrics=("chrf",))["chrf"]
    lo, hi = want["delta_ci95"]
    assert row == (f"| translation | 0.5 | hc-smoe | reap | {want['system']:.2f} | {want['baseline']:.2f} | "
                   f"{want['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {len(ids)} |")
    none = prune_vs_merge(db, rows[1:], {"data_dir": str(data)})
    assert any("no merge and prune points at the same ratio" in l for l in none)


@pytest.mark.parametrize("n_series", [1, 12])
def test_series_styles_differ(n_series: int) -> None:
    from moe_slim.sweep.plots import series_style

    styles = [series_style(i) for i in range(n_series)]
    assert len(set(styles)) == n_series and len({c for c, _ in styles}) == n_series
