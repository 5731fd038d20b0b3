"""Sweeps: resumable grid over mixes x methods x ratios, SQLite rows, Pareto fronts, spec checking."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from eval_fixtures import write_fixture_data

from moe_slim.cli import main
from moe_slim.errors import MoeSlimError
from moe_slim.modeling.tiny import save_tiny
from moe_slim.sweep.grid import simplex_grid
from moe_slim.sweep.report import pareto_front, write_report
from moe_slim.sweep.run import run_sweep
from moe_slim.sweep.spec import load_spec, parse_spec
from moe_slim.sweep.store import read_rows
from moe_slim.sweep.targets import best_for_target, command_for, parse_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    data = write_fixture_data(root / "data", n_per_domain=6, splits=("test", "calibration", "train"))
    model = save_tiny("qwen3_moe", root / "model", seed=3, max_position_embeddings=1024)
    return {"root": root, "data": str(data), "model": str(model)}


def _raw(world: dict, **over) -> dict:
    raw = {
        "name": "t", "model": world["model"], "data_dir": world["data"],
        "calibration": {"domains": ["general", "translation", "code"], "texts_per_domain": 4, "seq_len": 64,
                        "batch_size": 4, "samples": 256},
        "mixes": [{"translation": 1}, {"grid": {"domains": ["general", "translation"], "step": 1.0}}],
        "methods": ["reap", "frequency", "hc-smoe"],
        "ratios": [0.25, 0.5],
        "budgets": ["uniform"],
        "merge": {"max_tokens": 256, "align_tokens": 64},
        "eval": {"tasks": ["perplexity"], "limit": 2},
    }
    raw.update(over)
    return raw


def fake_eval(model, tok, ev):
    """A cheap deterministic metric of the weights (module level: picklable for --jobs)."""
    from moe_slim.families import moe_layers

    layers = moe_layers(model)
    s = sum(float(p.detach().double().abs().sum()) for name, p in model.named_parameters() if ".experts." in name)
    n = sum(l.num_experts for l in layers)
    return {"translation/chrf": round(s / 10.0, 6), "translation_choice/acc": round(n / 100.0, 6)}


def _metrics(db: Path) -> dict:
    rows, _ = read_rows(db)
    return {r["key"]: (r["method"], r["mix"], r["ratio"], r["params"], r["experts_kept"], r["metrics"]) for r in rows}


def test_interrupted_sweep_resumes_with_identical_results(world, tmp_path):
    spec = parse_spec(_raw(world))
    n_points = len(spec.points())
    assert n_points == 1 + 2 * 3 * 2  # baseline + mixes x methods x ratios (translation=1 appears once)

    full = run_sweep(spec, tmp_path / "full", progress=False, log=None)
    assert full["ran"] == n_points and full["remaining"] == 0

    seen = []
    part = run_sweep(spec, tmp_path / "part", max_points=3, on_point=seen.append, progress=False, log=None)
    assert part["ran"] == 3 and part["remaining"] == n_points - 3 and len(seen) == 3

    class Killed(Exception):
        pass

    def kill_after_two(row):
        if len(seen2) == 2:
            raise Killed
        seen2.append(row)

    seen2: list = []
    with pytest.raises(Killed):  # killed mid-run: rows committed before stay, nothing partial
        run_sweep(spec, tmp_path / "part", on_point=kill_after_two, progress=False, log=None)
    done = sqlite3.connect(tmp_path / "part" / "results.db").execute("SELECT COUNT(*) FROM points").fetchone()[0]
    assert done == 3 + 3  # the third row of that run was committed before the callback raised

    rest = run_sweep(spec, tmp_path / "part", progress=False, log=None)
    assert rest["already_done"] == done and rest["ran"] == n_points - done
    assert (tmp_path / "part" / "stats").is_dir() and len(list((tmp_path / "part" / "stats").iterdir())) == 1
    assert _metrics(tmp_path / "part" / "results.db") == _metrics(tmp_path / "full" / "results.db")

    again = run_sweep(spec, tmp_path / "part", progress=False, log=None)  # nothing left: no work
    assert again["ran"] == 0

    rows, meta = read_rows(tmp_path / "full" / "results.db")
    base = [r for r in rows if r["kind"] == "baseline"]
    assert len(base) == 1 and base[0]["ratio"] == 0 and base[0]["method"] == "none"
    merged = [r for r in rows if r["method"] == "hc-smoe" and r["ratio"] == 0.5]
    assert merged and all(r["experts_kept"] == 2 * 4 for r in merged)  # 2 layers x 4 experts
    r = rows[-1]
    assert r["ppl"] is not None and r["params"] < base[0]["params"] and r["versions"]["torch"]
    assert r["data_hashes"] and r["stats_fingerprint"] and r["model_hash"]

    rep = write_report(tmp_path / "full" / "results.db", target="ppl<=100*baseline")
    md = Path(rep["report"]).read_text()
    assert md.split("## All points")[1].count("| reap |") == 4 and "## chrF by method, mix and ratio" in md
    assert all(Path(p).stat().st_size > 1000 for p in rep["plots"])
    assert rep["best"]["kind"] != "baseline" and "moe-slim" in rep["command"]


def test_jobs_in_parallel_processes_match_serial(world, tmp_path):
    raw = _raw(world, methods=["reap", "ream"], ratios=[0.5],
               mixes=[{"translation": 1}, {"name": "gen", "weights": {"general": 1}}])
    spec = parse_spec(raw)
    serial = run_sweep(spec, tmp_path / "serial", evaluator=fake_eval, progress=False, log=None)
    assert serial["ran"] == 5
    run_sweep(spec, tmp_path / "par", evaluator=fake_eval, max_points=1, progress=False, log=None)
    par = run_sweep(spec, tmp_path / "par", evaluator=fake_eval, jobs=2, progress=False, log=None)
    assert par["already_done"] == 1 and par["ran"] == 4
    assert _metrics(tmp_path / "par" / "results.db") == _metrics(tmp_path / "serial" / "results.db")
    assert {r["mix"] for r in read_rows(tmp_path / "par" / "results.db")[0]} == {"-", "translation=1", "gen"}


def test_pareto_front_on_hand_made_points():
    pts = [(1.0, 50.0), (0.5, 48.0), (0.5, 45.0), (0.25, 30.0), (0.75, 47.0), (0.25, 30.0), (0.3, 20.0)]
    # minimise params, maximise chrF: (0.5,45) dominated by (0.5,48); (0.75,47) by (0.5,48);
    # (0.3,20) by (0.25,30); the duplicate (0.25,30) is kept once
    assert pareto_front(pts) == [3, 1, 0]
    # maximise both (MC accuracy vs generative score)
    mc = [(0.30, 40.0), (0.35, 30.0), (0.25, 45.0), (0.20, 44.0), (0.35, 29.0)]
    assert pareto_front(mc, (True, True)) == [2, 0, 1]
    assert pareto_front([(0.1, None), (0.2, 3.0)]) == [1]


def test_best_for_target_and_commands():
    def row(method, kind, ratio, kept, params, chrf, mix="translation=1", budget="uniform"):
        return {"key": f"{method}{ratio}{mix}", "method": method, "kind": kind, "ratio": ratio, "budget": budget,
                "mix": mix, "experts_kept": kept, "experts_total": 96, "params": params, "chrf": chrf,
                "mc_acc": 0.5, "math_em": None, "ppl": 10.0, "gen_score": chrf, "metrics": {"translation/chrf": chrf},
                "config": {"mix": {"translation": 1.0}, "seed": 0, "merge": {"max_tokens": 4096}}}

    rows = [row("none", "baseline", 0.0, 96, 100, 40.0, mix="-", budget="-"),
            row("reap", "prune", 0.25, 72, 80, 39.5), row("reap", "prune", 0.5, 48, 60, 39.3),
            row("ream", "merge", 0.5, 48, 60, 39.6), row("reap", "prune", 0.75, 24, 40, 30.0)]
    best = best_for_target(rows, "chrf>=0.98*baseline")
    assert best["method"] == "ream" and best["ratio"] == 0.5  # fewest experts, ties -> better chrF
    assert best_for_target(rows, "chrf>=45") is None
    assert best_for_target(rows, "ppl<=10")["ratio"] == 0.75
    assert parse_target("translation/chrf >= 0.9*baseline") == ("translation/chrf", ">=", 0.9, True)
    with pytest.raises(MoeSlimError, match="not METRIC"):
        parse_target("chrf is high")
    meta = {"model": "models/reference", "stats_dir": "runs/s/stats/abc"}
    assert command_for(rows[2], meta).startswith(
        "moe-slim prune models/reference --stats runs/s/stats/abc --criterion reap --ratio 0.5 --mix translation=1")
    assert command_for(best, meta).startswith("moe-slim merge models/reference --stats runs/s/stats/abc --method ream")


def test_simplex_grid():
    g = simplex_grid(["general", "math", "code"], 0.5)
    assert len(g) == 6 and {"general": 0.5, "math": 0.5} in g and {"code": 1.0} in g
    with pytest.raises(MoeSlimError, match="step 0.3"):
        simplex_grid(["a", "b"], 0.3)


@pytest.mark.parametrize("over, needle", [
    ({"methods": ["reap", "magic"]}, "unknown method 'magic'"),
    ({"ratios": [0.5, 1.5]}, "ratio 1.5"),
    ({"mixes": [{"klingon": 1}]}, "domain 'klingon'"),
    ({"mixes": [{"grid": {"domains": ["general", "poetry"], "step": 0.5}}]}, "domain 'poetry'"),
    ({"budgets": ["greedy"]}, "unknown budget 'greedy'"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"eval": {"suite": "quick", "limt": 3}}, "unknown key 'limt' in eval"),
    ({"eval": {"tasks": ["nonsense_task_xyz"]}}, "nonsense_task_xyz"),
    ({"calibration": {"domains": ["general", "law"]}, "mixes": [{"general": 1}]}, "calibration domain 'law'"),
    ({"recover": {"sft": {"stepz": 10}}}, "unknown key 'stepz' in recover.sft"),
    ({"recover": {"sft": {"steps": 0}}}, "recover.sft.steps must be an integer >= 1"),
    ({"model": "/nonexistent/model"}, "does not exist"),
])
def test_bad_spec_fails_before_any_work(world, tmp_path, capsys, over, needle):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_raw(world, **over)))
    out = tmp_path / "out"
    with pytest.raises(MoeSlimError) as exc:
        load_spec(spec_path)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert main(["sweep", str(spec_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-slim: ") and needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_sweep_and_report(world, tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_raw(world, methods=["reap"], ratios=[0.5], mixes=[{"translation": 1}],
                                             budgets=["uniform", "global"], floor=2)))
    out = tmp_path / "out"
    assert main(["sweep", str(spec_path), "--out", str(out), "--quiet", "--write-best", "ppl<=2*baseline"]) == 0
    text = capsys.readouterr().out
    assert "3 points run" in text and "write_best: reap ratio 0.5" in text
    assert (out / "best" / "config.json").exists() and (out / "best" / "plan.json").exists()
    assert main(["report", str(out / "results.db"), "--target", "ppl<=2*baseline", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "best for ppl<=2*baseline" in text and "moe-slim prune" in text
    assert json.loads(sqlite3.connect(out / "results.db").execute(
        "SELECT value FROM meta WHERE key='name'").fetchone()[0]) == "t"


def test_report_of_missing_database_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-slim: results database") and len(err.splitlines()) == 1
    assert main(["report", str(tmp_path / "nope.db"), "--target", "chrf>>1"]) == 2
    assert "not METRIC" in capsys.readouterr().err


def test_recover_stage_fine_tunes_each_pruned_point(world, tmp_path):
    spec = parse_spec(_raw(world, methods=["reap"], ratios=[0.5], mixes=[{"translation": 1}],
                           recover={"sft": {"steps": 1, "batch_size": 2, "seq_len": 64}}))
    run_sweep(spec, tmp_path / "rec", evaluator=fake_eval, progress=False, log=None)
    rows, _ = read_rows(tmp_path / "rec" / "results.db")
    pruned = next(r for r in rows if r["kind"] == "prune")
    assert pruned["metrics"]["sft/steps"] == 1 and "recover_s" in pruned["timings"]
    assert "sft/steps" not in next(r for r in rows if r["kind"] == "baseline")["metrics"]
    plain = parse_spec(_raw(world, methods=["reap"], ratios=[0.5], mixes=[{"translation": 1}]))
    run_sweep(plain, tmp_path / "plain", evaluator=fake_eval, progress=False, log=None)
    rows2, _ = read_rows(tmp_path / "plain" / "results.db")
    p2 = next(r for r in rows2 if r["kind"] == "prune")
    assert p2["key"] != pruned["key"] and p2["chrf"] != pruned["chrf"]  # recovery changed the weights
    cmd = command_for(pruned, {"model": "M", "stats_dir": "S", "data_dir": "data"})
    assert "moe-slim prune M --stats S --criterion reap" in cmd and "&& moe-slim sft pruned/ --data" in cmd
    assert "--steps 1 --batch-size 2 --seq-len 64" in cmd


def test_rows_of_an_earlier_model_stay_out_of_reports(world, tmp_path):
    """Re-running a sweep into the same database after the model changed: reports show the new model only."""
    raw = _raw(world, methods=["reap"], ratios=[0.5], mixes=[{"translation": 1}])
    out = tmp_path / "sweep"
    first = run_sweep(parse_spec(raw), out, evaluator=fake_eval, progress=False, log=None)
    assert first["ran"] == 2
    retrained = save_tiny("qwen3_moe", tmp_path / "retrained", seed=4, max_position_embeddings=1024)
    second = run_sweep(parse_spec(dict(raw, model=str(retrained))), out, evaluator=fake_eval, progress=False, log=None)
    assert second["ran"] == 2 and second["already_done"] == 0
    rows, meta = read_rows(out / "results.db")
    assert len(rows) == 2 and meta["stale_rows"] == 2
    assert {r["model_hash"] for r in rows} == {rows[0]["model_hash"]}
    assert sum(r["kind"] == "baseline" for r in rows) == 1
    everything, _ = read_rows(out / "results.db", stale=True)
    assert len(everything) == 4 and len({r["model_hash"] for r in everything}) == 2
    assert "2 rows of earlier sweeps or models" in Path(write_report(out / "results.db")["report"]).read_text()
    back = run_sweep(parse_spec(raw), out, evaluator=fake_eval, progress=False, log=None)  # the old rows are reused
    assert back["ran"] == 0 and back["already_done"] == 2
    assert {r["model_hash"] for r in read_rows(out / "results.db")[0]} == {r["model_hash"] for r in read_rows(
        tmp_path / "sweep" / "results.db", stale=True)[0]} - {rows[0]["model_hash"]}


def test_mone_in_a_sweep_keeps_novices_in_memory(world, tmp_path):
    spec = parse_spec(_raw(world, methods=["mone", "reap"], ratios=[0.5], mixes=[{"translation": 1}]))
    run_sweep(spec, tmp_path / "s", progress=False, log=None, evaluator=fake_eval)
    rows = {r["kind"] if r["kind"] == "baseline" else r["method"]: r for r in read_rows(tmp_path / "s" / "results.db")[0]}
    # MoNE keeps every expert in memory (the novices' weights are unused), pruning keeps half
    assert rows["mone"]["metrics"]["translation_choice/acc"] == rows["baseline"]["metrics"]["translation_choice/acc"]
    assert rows["reap"]["metrics"]["translation_choice/acc"] < rows["baseline"]["metrics"]["translation_choice/acc"]
    assert "moe-slim mone" in command_for(rows["mone"], {"model": world["model"]}, "OUT")
