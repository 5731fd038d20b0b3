"""Data-parallel observation on CPU (gloo, two processes on loopback) equals one process on the same text."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_slim.experts.stats import RouterStats
from moe_slim.modeling.tiny import save_tiny


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calib(tmp_path: Path, name: str, texts: list[str]) -> Path:
    p = tmp_path / f"{name}.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
ARGS = ["--seq-len", "16", "--batch-size", "2", "--samples", "40", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model = save_tiny("qwen3_moe", tmp / "model")
    gen = _calib(tmp, "gen", [f"sentence number {i} about foxes and dogs and other things" for i in range(9)])
    code = _calib(tmp, "code", [f"def f{i}(x):\n    return x * {i} + 1" for i in range(7)])
    return tmp, model, f"general={gen},code={code}"


def test_two_processes_equal_one(setup) -> None:
    tmp, model, calib = setup
    one = subprocess.run([sys.executable, "-m", "moe_slim", "observe", str(model), "--calib", calib, *ARGS,
                          "--no-layerwise", "--out", str(tmp / "one")], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_port()), "-m", "moe_slim", "observe", str(model),
                          "--calib", calib, *ARGS, "--layerwise", "--out", str(tmp / "two")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = RouterStats.load(tmp / "one"), RouterStats.load(tmp / "two")
    assert b.meta["processes"] == 2
    for d in a.domains:
        for f, t in a.domains[d].items():
            if f in ("tokens", "count", "coselect", "norm_max"):
                assert torch.equal(t, b.domains[d][f]), (d, f)
            else:  # float64 sums added in another order
                torch.testing.assert_close(t, b.domains[d][f], rtol=1e-12, atol=1e-9)
    sa, sb = a.samples.tensors(), b.samples.tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(tmp.glob(".two.layerwise*")), "work directories are removed"


def test_ranks_with_different_calibration_refuse(setup) -> None:
    tmp, model, calib = setup
    port = str(_port())
    other = calib.split(",")[0]  # rank 1 is given only the general domain
    procs = []
    for rank, c in ((0, calib), (1, other)):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "moe_slim", "observe", str(model), "--calib", c, *ARGS,
                                       "--no-layerwise", "--out", str(tmp / "mismatch")],
                                      env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2
        lines = [l for l in err.strip().splitlines() if l.startswith("moe-slim:")]
        assert lines and "other calibration text or model than rank 0" in lines[-1]
    assert not (tmp / "mismatch").exists()
