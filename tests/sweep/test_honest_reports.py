"""Honest reports: every score with its n, chrF differences with paired-bootstrap intervals, "best" only
where the interval clears the target, the target line names its metric, SFT sweeps keep both scores."""

from __future__ import annotations

import numpy as np
import pytest
from eval_fixtures import write_fixture_data

from moe_slim.evals.translation import paired_bootstrap
from moe_slim.modeling.tiny import save_tiny
from moe_slim.sweep.report import table, target_line, write_report
from moe_slim.sweep.run import run_sweep
from moe_slim.sweep.spec import parse_spec
from moe_slim.sweep.store import open_db, read_rows
from moe_slim.sweep.targets import best_for_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _row(method, kept, chrf, delta=None, ci=None, kind="prune", n=120):
    m = {"translation/chrf": chrf, "translation/n": n}
    if delta is not None:
        m.update({"translation/chrf_delta_vs_baseline": delta, "translation/chrf_delta_lo": delta - ci,
                  "translation/chrf_delta_hi": delta + ci, "translation/chrf_lo": chrf - ci,
                  "translation/chrf_hi": chrf + ci})
    return {"key": f"{method}{kept}", "method": method, "kind": kind, "ratio": 1 - kept / 16, "budget": "uniform",
            "mix": "t", "experts_kept": kept, "experts_total": 16, "params": kept * 10, "chrf": chrf,
            "mc_acc": None, "math_em": None, "ppl": None, "gen_score": chrf, "metrics": m, "kept_per_layer": [kept]}


def test_best_needs_an_interval_that_clears_the_target() -> None:
    base = _row("none", 16, 30.0, kind="baseline")
    noisy = _row("reap", 4, 30.5, delta=0.5, ci=2.0)   # estimate above 0.98*baseline, interval reaches -1.5
    solid = _row("reap", 8, 29.9, delta=-0.1, ci=0.4)   # interval [-0.5, +0.3] clears -0.6 (= 0.98*30 - 30)
    best = best_for_target([base, noisy, solid], "chrf>=0.98*baseline")
    assert best["key"] == solid["key"] and best["basis"] == "95% interval"
    assert "chrf 29.900 [29.50, 30.30] (n=120), vs baseline ~-0.10 [-0.50, +0.30]" in target_line(best)
    assert best_for_target([base, noisy], "chrf>=0.98*baseline")["kind"] == "baseline"  # nothing smaller qualifies
    assert best_for_target([base, _row("reap", 4, 31.0)], "chrf>=0.98*baseline")["basis"].startswith("point estimate")


def test_our_paired_bootstrap_is_sacrebleus_paired_test(monkeypatch) -> None:
    """One computation gives the difference's interval too; its p-value and system interval are sacrebleu's."""
    from sacrebleu.metrics import CHRF
    from sacrebleu.significance import PairedTest

    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog in the open file window".split()
    refs = [" ".join(rng.choice(words, 9)) for _ in range(60)]
    sys = [r if rng.random() < 0.5 else " ".join(rng.choice(words, 9)) for r in refs]
    base = [r if rng.random() < 0.3 else " ".join(rng.choice(words, 9)) for r in refs]
    ours = paired_bootstrap(sys, base, refs, metrics=("chrf",), n_samples=500, seed=12345)["chrf"]
    monkeypatch.setenv("SACREBLEU_SEED", "12345")
    _, scores = PairedTest([("baseline", base), ("system", sys)], {"chrF": CHRF()}, [refs], test_type="bs",
                           n_samples=500)()
    theirs = next(v for k, v in scores.items() if k.startswith("chrF"))[1]
    assert ours["p_value"] == pytest.approx(theirs.p_value)
    lo, hi = ours["system_ci95"]
    assert ours["system"] == pytest.approx(theirs.score)
    assert (hi - lo) / 2 == pytest.approx(theirs.ci, rel=0.05)  # percentile vs sacrebleu's symmetric 1/40 bounds


def test_a_real_sweep_stores_n_and_paired_intervals(tmp_path) -> None:
    data = write_fixture_data(tmp_path / "data", n_per_domain=6, splits=("test", "calibration", "train", "validation"))
    model = save_tiny("qwen3_moe", tmp_path / "model", seed=3, max_position_embeddings=1024)
    spec = parse_spec({"name": "h", "model": str(model), "data_dir": str(data),
                       "calibration": {"domains": ["general", "translation"], "texts_per_domain": 3, "seq_len": 32},
                       "mixes": [{"translation": 1}], "methods": ["reap"], "ratios": [0.5],
                       "eval": {"tasks": ["translation", "translation_choice"], "limit": 4},
                       "recover": {"sft": {"steps": 1, "mix": "translation=1", "batch_size": 2, "seq_len": 32,
                                           "val_examples": 2}}})
    run_sweep(spec, tmp_path / "sweep", progress=False, log=None)
    rows, _ = read_rows(tmp_path / "sweep")
    point = next(r for r in rows if r["kind"] == "prune")
    m = point["metrics"]
    assert m["translation/n"] == 12 and m["translation_choice/n"] == 4
    assert m["translation/chrf_delta_lo"] <= m["translation/chrf_delta_vs_baseline"] <= m["translation/chrf_delta_hi"]
    assert "before_sft/translation/chrf" in m and "sft/val_loss_after" in m
    conn = open_db(tmp_path / "sweep" / "results.db")
    assert conn.execute("SELECT COUNT(*) FROM hypotheses").fetchone()[0] == 2
    text = table(rows)
    assert "(n=12)" in text and "(n=4)" in text and "[" in text
    rep = write_report(tmp_path / "sweep" / "results.db", target="mc_acc>=0.01*baseline", plots=False)
    line = target_line(rep["best"])
    assert line.startswith("mc_acc ") and "(n=4)" in line and "decided on the 95% interval" in line
