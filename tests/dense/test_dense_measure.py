"""Measuring the slimmed model itself: the cached MC scorer equals the plain one; retention and paired
bootstrap differences."""

from __future__ import annotations

import random

import numpy as np
import pytest

from moe_slim.dense.measure import mc_scores, mc_scores_plain, paired_difference, retention
from moe_slim.dense.tiny import WORDS, tiny_model, toy_tokenizer


def test_cached_mc_scores_equal_running_every_choice_with_the_query():
    model, tok = tiny_model("llama", seed=3).eval(), toy_tokenizer()
    rng = random.Random(0)
    for _ in range(6):
        item = {"query": " ".join(rng.choice(WORDS) for _ in range(9)), "gold": 0,
                "choices": [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]}
        assert mc_scores(model, tok, item, 6) == pytest.approx(mc_scores_plain(model, tok, item, 6), abs=1e-4)


def test_paired_difference_and_retention():
    a = {"t1": [1, 1, 1, 0] * 10, "t2": [1, 0] * 20}
    same = paired_difference(a, a, samples=200)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0] and same["verdict"] == "tie" and same["n"] == 80
    worse = {"t1": [0] * 40, "t2": [0] * 40}
    d = paired_difference(a, worse, samples=500, scale=0.5)
    assert d["delta"] == pytest.approx((0.75 + 0.5) / 2 / 0.5) and d["verdict"] == "better"
    assert paired_difference(worse, a, samples=500)["verdict"] == "worse"
    full = {"items": a, "accuracy": {"t1": 0.75, "t2": 0.5}, "ppl": {"general": 10.0, "code": 4.0}}
    slim = {"items": {"t1": [1, 0] * 20, "t2": [1, 0] * 20}, "accuracy": {"t1": 0.5, "t2": 0.5},
            "ppl": {"general": 20.0, "code": 4.0}}
    r = retention(slim, full)
    assert r["headline"] == pytest.approx(0.5 / 0.625) and r["headline_metric"] == "MC accuracy retention"
    assert r["ppl_retention"] == pytest.approx(0.75) and r["n"] == 80
    assert np.isclose(r["tasks"]["t1"]["full_accuracy"], 0.75)


def test_probe_scores_every_plan_on_its_own_outputs_before_and_after_healing(tmp_path):
    import json

    from eval_fixtures import write_fixture_data

    from moe_slim.cli import main
    from moe_slim.dense.tiny import save_tiny, synthetic_tasks

    data = write_fixture_data(tmp_path / "data", n_per_domain=8, splits=("train", "test"))
    src = save_tiny(tiny_model("llama", seed=4), tmp_path / "model")
    tasks = synthetic_tasks(tmp_path / "tasks", n_per_class=12)
    out = tmp_path / "run"
    assert main(["probe", str(src), "--tasks", str(tasks["topic"]), "--budget", "x2", "--scaling", "off", "--folds", "3",
                 "--data", str(data), "--model-eval", "on", "--mc-limit", "3", "--heal", "2", "--out", str(out)]) == 0
    own = json.loads((out / "own_outputs.json").read_text())
    assert set(own["methods"]) >= {"probscale-contiguous", "block-influence", "angular", "last-layers", "random"}
    sizes = {e["params"] for e in own["methods"].values()}
    assert len(sizes) == 1  # equal size
    for e in own["methods"].values():
        assert e["own"]["n"] == e["own_healed"]["n"] > 0 and e["heal"]["steps"] == 2
        assert set(e["own"]["ppl"]) == {"general", "math", "code", "translation"}
    assert set(own["differences"]) == {"before", "after"}
    d = own["differences"]["before"]["random"]
    assert d["ci95"][0] <= d["delta"] <= d["ci95"][1]
    compare = json.loads((out / "compare.json").read_text())
    assert "own" in compare["probscale-contiguous"] and "own_healed" in compare["random"]


def test_compare_methods_reports_each_method_as_it_goes():
    from moe_slim.dense.compare import compare_methods
    from moe_slim.dense.select import Selection

    model = tiny_model("llama", seed=1)
    sels = {"probscale-contiguous": Selection("probscale-contiguous", {"decoder": [0, 1, 2]}, 30, 30, 60),
            "random": Selection("random", {"decoder": [0, 2, 4]}, 30, 30, 60)}
    seen = []
    table = compare_methods(model, toy_tokenizer(), sels, on_method=lambda m, e: seen.append((m, e["params"])),
                            probe_healed=False)
    assert seen == [("probscale-contiguous", 30), ("random", 30)]
    assert table["methods"]["random"]["reduction"] == 2.0 and table["differences"] == {}
