"""The prepared GPU check (bench/device_check.sh) cannot rot: its CPU dry run passes every step and
writes its figures, and its own judges (statistics comparison, time limits, wheel resolution) fail
when they should."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "device"))

from compare import compare_stats  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from runner import Figures, Runner, StepFailed  # noqa: E402
from wheels import needs, read_image  # noqa: E402

from moe_slim.experts.stats import RouterStats, empty_domain  # noqa: E402
from moe_slim.modeling.tiny import TINY_FAMILIES  # noqa: E402

FIGURE_FILES = ["compare.tsv", "environment.json", "log.txt", "speed.tsv", "steps.tsv", "summary.txt"]


def test_cpu_dry_run_passes_every_step(tmp_path: Path) -> None:
    figures = tmp_path / "figures"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--cpu", str(figures),
                           "--work", str(tmp_path / "work"), "--budget", "600"],
                          env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=700)
    wall = time.monotonic() - t0
    lines = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines and all(line.startswith("PASS ") for line in lines), "\n".join(lines)
    names = [line.split()[1] for line in lines]
    expected = ["env", "build", *(f"tiny-observe:{f}" for f in TINY_FAMILIES), "observe-reference-cpu-float32",
                "observe-cpu-f32", "observe-cpu-bf16", "observe-cpu-layerwise-f32", "observe-cpu-layerwise-bf16",
                "observe-device-map-auto", "observe-torchrun", "prune-stream", "merge-hc-smoe",
                "merge-ream-sequential", "mone", "eval-translation", "sft"]
    assert names == expected
    assert sorted(p.name for p in figures.iterdir()) == FIGURE_FILES  # at most 8 files come back from a GPU run
    with open(figures / "steps.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["step"] for r in rows] == expected and all(r["status"] == "PASS" for r in rows)
    assert all(float(r["wall_s"]) > 0 for r in rows)
    assert all(float(rows[names.index(n)]["tokens_per_s"]) > 0 for n in ("observe-cpu-f32", "eval-translation", "sft"))
    with open(figures / "compare.tsv") as f:
        compared = {r["comparison"] for r in csv.DictReader(f, delimiter="\t")}
    assert {f"{f} cpu bf16" for f in TINY_FAMILIES} <= compared and "stats-torchrun" in compared
    assert (figures / "summary.txt").read_text().splitlines() == lines
    # correctness, not speed, is asserted: a loaded machine must not fail it (the 110 s default budget is the goal)
    print(f"CPU dry run: {wall:.0f} s")


def _stats(seed: int = 0) -> RouterStats:
    g = torch.Generator().manual_seed(seed)
    d = empty_domain(2, 4)
    d["tokens"] += 10
    d["count"] += torch.tensor([[6.0, 5, 5, 4], [7, 3, 6, 4]])  # 10 tokens x top-2 per layer
    d["coselect"] += torch.randint(0, 3, (2, 4, 4), generator=g).double()
    for f in ("weight_sum", "soft_sum", "norm_sum", "wnorm_sum", "norm_max"):
        d[f] += torch.rand(2, 4, generator=g, dtype=torch.float64) + 1
    return RouterStats(domains={"general": d}, meta={})


def test_comparison_holds_counts_exact_and_sums_close() -> None:
    ref = _stats()
    assert compare_stats("same", ref, _stats()).ok
    close = _stats()
    close.domains["general"]["norm_sum"] *= 1 + 1e-6
    assert compare_stats("rounding", ref, close).ok
    moved = _stats()
    moved.domains["general"]["count"][0, :2] += torch.tensor([1.0, -1.0])  # one routing decision moved
    cmp = compare_stats("moved", ref, moved)
    assert not cmp.ok and "general/count differs in 2 of 8 cells" in cmp.problems[0]
    assert compare_stats("moved, bf16", ref, moved, "bfloat16").ok  # bf16: same selections per layer, close counts
    off = _stats()
    off.domains["general"]["wnorm_sum"] *= 1.01
    assert not compare_stats("sums", ref, off).ok and compare_stats("sums, bf16", ref, off, "bfloat16").ok
    lost = _stats()
    lost.domains["general"]["count"][1, 0] -= 1  # a selection lost: never right, in any dtype
    assert not compare_stats("lost", ref, lost, "bfloat16").ok
    garbage = _stats()
    garbage.domains["general"]["count"] = torch.tensor([[20.0, 0, 0, 0], [0, 0, 0, 20]])  # same totals, other experts
    assert not compare_stats("garbage", ref, garbage, "bfloat16").ok
    fewer = _stats()
    fewer.domains["general"]["tokens"] -= 1
    assert not compare_stats("tokens", ref, fewer, "bfloat16").ok


def test_runner_fails_slow_and_broken_steps_and_skips_past_the_budget(tmp_path: Path, capsys) -> None:
    figures = Figures(tmp_path)
    run = Runner(figures, budget_s=8.0, log=open(os.devnull, "w"))
    assert run.run("fine", 5, lambda: {"tokens_per_s": 10.0}).status == "PASS"
    assert run.run("slow", 1, lambda: time.sleep(5)).detail == "over its limit of 1 s"
    assert run.run("judged", 5, lambda: (_ for _ in ()).throw(StepFailed("counts differ"))).detail == "counts differ"
    assert run.run("crash", 5, lambda: 1 / 0).detail.startswith("ZeroDivisionError")
    time.sleep(max(0.0, run.left()))
    assert run.run("late", 5, lambda: None).status == "SKIP"
    assert [r.status for r in figures.results] == ["PASS", "FAIL", "FAIL", "FAIL", "SKIP"] and run.failed()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS fine (") and "10 tok/s" in out[0] and out[1].startswith("FAIL slow")


def test_wheels_travel_when_the_image_lacks_them_or_has_another_version() -> None:
    image = read_image()
    assert image["torch"] == "2.11.0" and image["transformers"] == "5.17.0" and "pydantic" not in image
    assert needs(Requirement("pydantic>=2"), image) == "not in the image"
    assert needs(Requirement("transformers>=5.0,<6"), image) is None
    assert needs(Requirement("transformers>=5.20"), image) == "image has 5.17.0, needs >=5.20"
    assert needs(Requirement("pywin32; sys_platform == 'win32'"), image) is None  # not for the GPU machine
    assert needs(Requirement("tomli; python_version < '3.11'"), image) is None  # its Python is 3.12


@pytest.mark.parametrize("script", ["device_check.sh", "device_check_prepare.sh"])
def test_scripts_are_executable(script: str) -> None:
    assert os.access(ROOT / "bench" / script, os.X_OK)
