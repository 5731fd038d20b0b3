"""A write killed mid-way (SIGKILL at a test-only pause point) leaves the output absent; the next run into
the same place cleans up what the killed one left and succeeds. Checkpoints (streamed and in memory),
statistics, evaluation results and sweep databases."""

from __future__ import annotations

import json
import os
import shutil
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


# -- issue 29: two runs into one --out, a full disk, a sweep's report, derived caches, crafted packages ---------


def start_paused(args: list[str], point: str, flag: Path) -> subprocess.Popen:
    env = dict(ENV, MOE_SLIM_TEST_PAUSE=point, MOE_SLIM_TEST_PAUSE_FLAG=str(flag))
    return subprocess.Popen([sys.executable, "-m", "moe_slim", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(flags: list[Path], procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 180
    while not all(f.exists() for f in flags):
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a run ended before its pause point: {p.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail("the runs never reached their pause points")
        time.sleep(0.05)


@pytest.mark.parametrize("release", ["one after the other", "at once"])
def test_two_runs_into_the_same_out_never_replace_each_other(world, tmp_path, release) -> None:
    """Both runs pass the early check (the output is absent), finish their work, and reach the commit; the
    commit re-checks the rule, so exactly one writes the output and the other says so in one line."""
    m = tiny_model("qwen3_moe", seed=3)
    plans = []
    for name, keep in (("a", [0, 2, 4, 6]), ("b", [1, 3, 5, 7])):
        ExpertPlan("qwen3_moe", 8, 2, [LayerPlan(l.name, keep) for l in moe_layers(m)]).save(tmp_path / f"{name}.json")
        plans.append(tmp_path / f"{name}.json")
    out = tmp_path / "pruned"
    flags = [tmp_path / "flag-a", tmp_path / "flag-b"]
    procs = [start_paused(["apply", world["model"], "--plan", str(p), "--out", str(out), "--quiet"], "before-commit", f)
             for p, f in zip(plans, flags)]
    wait_for(flags, procs)
    assert not out.exists()
    if release == "one after the other":
        flags[0].unlink()
        assert procs[0].wait(timeout=120) == 0
        flags[1].unlink()
    else:
        for f in flags:
            f.unlink()
    codes = [p.wait(timeout=120) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2], (codes, errs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lines = errs[loser].strip().splitlines()
    assert len(lines) == 1 and "appeared while this run was working" in lines[0], errs[loser]
    kept = json.loads((out / "plan.json").read_text())["layers"][0]["keep"]
    assert kept == ([0, 2, 4, 6], [1, 3, 5, 7])[winner]  # the winner's output, whole, untouched by the other
    assert leftovers(out) == []


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of ``request.param`` bytes: room for a directory and the small files, not for the weights or the
    statistics, so the disk fills inside safetensors' ``save_file`` (whose error is not an ``OSError``)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        reason = f"mounting a tmpfs is not permitted here ({proc.stderr.strip() or 'not root'}); CI runs it as root"
        print(reason)
        pytest.skip(reason)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("command, small_disk", [("prune --in-memory", "16k"), ("observe", "4k")],
                         indirect=["small_disk"])
def test_a_full_disk_is_one_line_and_leaves_nothing(world, small_disk, command) -> None:
    out = small_disk / "out"
    if command == "observe":
        args = ["observe", world["model"], "--calib", f"general={world['calib']}", "--out", str(out), "--seq-len",
                "16", "--no-layerwise", "--quiet"]
    else:
        args = ["apply", world["model"], "--plan", world["plan"], "--out", str(out), "--in-memory", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "moe_slim", *args], env=ENV, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == f"moe-slim: could not write {out}: No space left on device", lines[0]
    assert list(small_disk.iterdir()) == []  # neither the output nor a temporary directory


def test_report_never_replaces_a_checkpoint_and_caches_stay_out_of_the_data(world, tmp_path, monkeypatch) -> None:
    """The sweep's report goes to report/ in the sweep (rewritten freely); a report into a checkpoint is refused,
    with --overwrite too. The multiple-choice items a sweep derives are cached outside --data-dir (an input)."""
    from moe_slim.cli import main
    from moe_slim.evals.mc import prepare_mc_data
    from moe_slim.outputs import cache_dir

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "r", "model": world["model"], "data_dir": world["data"],
        "calibration": {"domains": ["general"], "texts_per_domain": 2, "seq_len": 16, "batch_size": 2},
        "mixes": [{"general": 1}], "methods": ["frequency"], "ratios": [0.5],
        "eval": {"tasks": ["perplexity"], "limit": 1}}))
    sweep = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(sweep), "--quiet", "--no-report"]) == 0
    assert json.loads((sweep / ".moe_slim").read_text())["kind"] == "sweep"
    ckpt = tmp_path / "ckpt"
    assert main(["apply", world["model"], "--plan", world["plan"], "--out", str(ckpt), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert main(["report", str(sweep / "results.db"), "--out", str(ckpt), "--no-plots"]) == 2
    assert main(["report", str(sweep / "results.db"), "--out", str(ckpt), "--no-plots", "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    for _ in range(2):  # the default place is the sweep's own report, rewritten each time
        assert main(["report", str(sweep / "results.db"), "--no-plots"]) == 0
    assert json.loads((sweep / "report" / ".moe_slim").read_text())["kind"] == "report"
    data = Path(world["data"])
    files = sorted(p for p in data.rglob("*") if p.is_file())
    monkeypatch.setenv("MOE_SLIM_CACHE", str(tmp_path / "cache"))
    info = prepare_mc_data("translation_choice", data)
    assert Path(info["path"]).parent.parent == cache_dir() / "mc" == tmp_path / "cache" / "mc"
    assert sorted(p for p in data.rglob("*") if p.is_file()) == files and not (data / "mc").exists()


def _deb(root: Path, members: dict[str, int]) -> Path:
    """A .deb named a2ps whose files are ``members`` (path -> size in bytes, zeros: a few KB compressed)."""
    pkg = root / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: a2ps\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: t <t@t>\nDescription: t\n")
    for name, size in members.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        with open(pkg / name, "wb") as fh:
            fh.truncate(size)
    debs = root / "cache" / "debs"
    debs.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(pkg), str(debs / "a2ps_1.0_all.deb")], check=True,
                   capture_output=True)
    return debs / "a2ps_1.0_all.deb"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
def test_a_crafted_deb_is_never_read_whole(tmp_path) -> None:
    """A catalog member above 8 MiB is skipped without being read (the tar stream skips it in blocks), and the
    package is hashed by streaming: far less Python memory than the member's size."""
    import hashlib
    import tracemalloc

    from moe_slim.data.sources import fetch_debian_catalogs

    deb = _deb(tmp_path, {"usr/share/locale/de/LC_MESSAGES/big.mo": 40 << 20,
                          "usr/share/locale/de/LC_MESSAGES/small.mo": 1000})
    tracemalloc.start()
    try:
        (got,) = fetch_debian_catalogs(["a2ps"], tmp_path / "cache", download=False, langs=("de",))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB of Python memory for a 40 MiB member"
    assert sorted(p.name for p in (got.root / "de" / "LC_MESSAGES").iterdir()) == ["small.mo"]
    assert got.sha256 == hashlib.sha256(deb.read_bytes()).hexdigest()
