"""A write killed mid-way (SIGKILL at a test-only pause point) leaves the output absent; the next run into
the same place cleans up what the killed one left and succeeds. Checkpoints (streamed and in memory),
statistics, evaluation results and sweep databases."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from eval_fixtures import write_fixture_data

from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.families import moe_layers
from moe_slim.modeling.tiny import save_tiny, tiny_model

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run_killed(args: list[str], point: str, tmp: Path) -> None:
    """Start ``moe-slim ARGS``, wait until it reaches ``point``, SIGKILL it."""
    flag = tmp / f"paused-{point}-{time.monotonic_ns()}"
    env = dict(ENV, MOE_SLIM_TEST_PAUSE=point, MOE_SLIM_TEST_PAUSE_FLAG=str(flag))
    proc = subprocess.Popen([sys.executable, "-m", "moe_slim", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before reaching {point}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the command never reached {point}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def run_ok(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "moe_slim", *args], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("crash")
    model = save_tiny("qwen3_moe", root / "model", seed=3, max_position_embeddings=1024)
    m = tiny_model("qwen3_moe", seed=3)
    layers = moe_layers(m)
    ExpertPlan("qwen3_moe", 8, 2, [LayerPlan(l.name, [0, 2, 4, 6]) for l in layers]).save(root / "plan.json")
    data = write_fixture_data(root / "data", n_per_domain=6, splits=("test", "calibration", "train"))
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"text number {i} with some words"}) + "\n" for i in range(20)))
    return {"root": root, "model": str(model), "plan": str(root / "plan.json"), "data": str(data),
            "calib": str(calib)}


@pytest.mark.parametrize("how, point", [
    ([], "after-first-file"),            # streamed shards: killed after the first shard file
    (["--in-memory"], "after-first-file"),  # save_pretrained done, card not yet written
    ([], "before-commit"),               # everything written and fsynced, not yet renamed
])
def test_killed_checkpoint_write_leaves_nothing_and_the_next_run_cleans_up(world, tmp_path, how, point) -> None:
    out = tmp_path / "pruned"
    args = ["apply", world["model"], "--plan", world["plan"], "--out", str(out), "--max-shard-size", "20KB", *how]
    run_killed(args, point, tmp_path)
    assert not out.exists()
    assert leftovers(out), "the killed run left its temporary directory"
    err = run_ok(args)
    assert "left in" in err and "by a run that was killed" in err
    assert out.is_dir() and (out / "config.json").is_file() and (out / ".moe_slim").is_file()
    assert leftovers(out) == []


def test_killed_stats_write_and_eval_results(world, tmp_path) -> None:
    stats = tmp_path / "stats"
    args = ["observe", world["model"], "--calib", f"general={world['calib']}", "--out", str(stats), "--seq-len", "16",
            "--no-layerwise", "--quiet"]
    run_killed(args, "after-first-file", tmp_path)
    assert not stats.exists() and leftovers(stats)
    run_ok(args)
    assert (stats / "meta.json").is_file() and leftovers(stats) == []
    res = tmp_path / "results.json"
    eargs = ["eval", world["model"], "--tasks", "perplexity", "--limit", "2", "--data", world["data"], "--out",
             str(res), "--quiet"]
    run_killed(eargs, "before-commit", tmp_path)
    assert not res.exists() and leftovers(res)
    run_ok(eargs)
    assert json.loads(res.read_text())["kind"] == "moe_slim.eval" and leftovers(res) == []


def test_killed_sweep_resumes_from_its_database(world, tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "k", "model": world["model"], "data_dir": world["data"],
        "calibration": {"domains": ["general", "translation"], "texts_per_domain": 3, "seq_len": 32, "batch_size": 4},
        "mixes": [{"translation": 1}], "methods": ["reap", "frequency"], "ratios": [0.5],
        "eval": {"tasks": ["perplexity"], "limit": 2}}))
    out = tmp_path / "sweep"
    args = ["sweep", str(spec), "--out", str(out), "--quiet", "--no-report"]
    run_killed(args, "after-first-point", tmp_path)
    with sqlite3.connect(out / "results.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM points").fetchone()[0] == 1
    proc = subprocess.run([sys.executable, "-m", "moe_slim", *args], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 points run, 1 already done, 0 remaining" in proc.stdout
