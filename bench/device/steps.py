"""The device check's steps: build the checkpoints, then run every device path of moe_slim and compare.

Each step is the real command (``moe_slim.cli.main`` in this process, ``torchrun`` in a subprocess)
on the generated checkpoints; statistics are compared with a float32 CPU run of the same inputs
(``compare.py``); the same work on the CPU, run last, gives the GPU/CPU speed ratios.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compare import compare_stats
from runner import Figures, StepFailed, cli

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent


@dataclass
class Setup:
    """Where the check runs and on what: ``device`` for the device paths, ``big`` for the generated ~2 GB MoE."""

    device: str
    big: bool
    work: Path
    figures: Figures
    big_layers: int = 8
    seconds: dict[str, float] = field(default_factory=dict)  # work -> seconds on the device / "cpu:work" on CPU
    log: Any = sys.stderr

    @property
    def model(self) -> Path:
        return self.work / ("big" if self.big else "tiny-qwen3_moe")

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def calib(self) -> str:
        return ",".join(f"{d}={self.data / d / 'train.jsonl'}" for d in ("general", "code"))

    @property
    def sizes(self) -> dict[str, str]:
        """Token budgets: enough to load the GPU on the big model, a few seconds of CPU on the tiny one."""
        if self.big:
            return dict(seq_len="256", batch="8", tokens="8k", samples="4k", merge_tokens="2k", limit="16", steps="5")
        return dict(seq_len="64", batch="4", tokens="2k", samples="512", merge_tokens="512", limit="4", steps="3")


# -- building ------------------------------------------------------------------------------------

def build(s: Setup) -> dict[str, Any]:
    """The data (fixture records of the four domains), a tiny model of every family, and the main model."""
    sys.path[:0] = [str(ROOT / "tests"), str(BENCH)]
    from eval_fixtures import write_fixture_data
    from memory_common import build_model

    from moe_slim.modeling.tiny import TINY_FAMILIES, save_tiny

    write_fixture_data(s.data, 200 if s.big else 48, splits=("train", "validation", "test"))
    for family in TINY_FAMILIES:
        if not (s.work / f"tiny-{family}" / "config.json").is_file():
            save_tiny(family, s.work / f"tiny-{family}")
    if s.big and not (s.model / "config.json").is_file():
        build_model(s.model, s.big_layers)
    size = sum(f.stat().st_size for f in s.model.glob("*.safetensors"))
    return {"detail": f"{len(TINY_FAMILIES)} tiny families; main model {size / 1e9:.2f} GB ({s.model.name})"}


# -- observation ---------------------------------------------------------------------------------

def _record(s: Setup, name: str, ref: Any, got: Any, dtype: str) -> None:
    cmp = compare_stats(name, ref, got, dtype)
    s.figures.comparisons += [dict(comparison=name, **row) for row in cmp.rows]
    if not cmp.ok:
        raise StepFailed("; ".join(cmp.problems[:3]) + (f" (+{len(cmp.problems) - 3} more)" if len(cmp.problems) > 3
                                                        else ""))


def tiny_family(s: Setup, family: str) -> dict[str, Any]:
    """One tiny family through the Python API: CPU float32 whole model against the device paths."""
    sys.path.insert(0, str(ROOT / "tests"))
    from eval_fixtures import fixture_records

    from moe_slim.api import observe_checkpoint

    recs = fixture_records(6)
    texts = {d: [r["text"] for r in recs[d]] for d in ("general", "code")}
    path, out = s.work / f"tiny-{family}", s.work / "tiny-stats"
    kw = dict(seq_len=32, batch_size=4, samples=64, progress=False, overwrite=True)
    ref = observe_checkpoint(path, texts, out / f"{family}-cpu", device="cpu", dtype="float32", layerwise=False, **kw)
    runs = [("layerwise-f32", True, "float32"), ("bf16", False, "bfloat16")]
    if s.device != "cpu":
        runs.insert(0, ("f32", False, "float32"))
    for label, layerwise, dtype in runs:
        got = observe_checkpoint(path, texts, out / f"{family}-{label}", device=s.device, dtype=dtype,
                                 layerwise=layerwise, **kw)
        _record(s, f"{family} {s.device} {label}", ref, got, dtype)
    return {"detail": f"{', '.join(r[0] for r in runs)} vs CPU float32"}


def observe_args(s: Setup, out: str) -> list[str]:
    z = s.sizes
    return ["observe", str(s.model), "--calib", s.calib, "--data-dir", str(s.data), "--seq-len", z["seq_len"],
            "--batch-size", z["batch"], "--max-tokens", z["tokens"], "--samples", z["samples"], "--quiet",
            "--overwrite", "--out", str(s.work / out)]


def observe(s: Setup, out: str, extra: list[str], dtype: str, compare: bool = True) -> dict[str, Any]:
    """``moe-slim observe`` on the main model; its statistics compared with the CPU run's."""
    from moe_slim.experts.stats import RouterStats

    res = cli([*observe_args(s, out), *extra], log=s.log)
    tokens = sum(res["tokens_per_domain"].values())
    s.seconds[out] = res["seconds"]
    if compare:
        _record(s, out, RouterStats.load(s.work / "stats-cpu"), RouterStats.load(s.work / out), dtype)
    return {"tokens_per_s": tokens / res["seconds"] if res["seconds"] else None,
            "detail": f"{tokens} tokens" + (", matches CPU" if compare else "")}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def observe_torchrun(s: Setup) -> dict[str, Any]:
    """``torchrun --nproc-per-node 1`` running observe through the data-parallel path (``probe.py``); the
    step's time limit (SIGALRM) interrupts the wait, and the launcher and its worker are killed."""
    from moe_slim.experts.stats import RouterStats

    probe_out = s.work / "torchrun.json"
    probe_out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), str(BENCH / "device" / "probe.py"), str(probe_out), "--one-rank-group",
           *observe_args(s, "stats-torchrun"), "--device", s.device, "--dtype", "float32", "--no-layerwise"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its worker
        proc.wait()
        raise
    s.log.write(f"$ {' '.join(cmd)}\n{output[-4000:]}")
    if proc.returncode != 0 or not probe_out.is_file():
        lines = [line for line in output.splitlines() if line.strip()]
        raise StepFailed(f"exit {proc.returncode}: {lines[-1] if lines else '(no output)'}")
    probe = json.loads(probe_out.read_text())
    got = RouterStats.load(s.work / "stats-torchrun")
    _record(s, "stats-torchrun", RouterStats.load(s.work / "stats-cpu"), got, "float32")
    want = "nccl" if s.device.startswith("cuda") else "gloo"
    if probe["backend"] is None or want not in probe["backend"]:
        raise StepFailed(f"process group backend {probe['backend']}, expected {want}")
    return {"peak_gpu_mib": probe["peak_gpu_mib"],
            "detail": f"backend {probe['backend']}, {got.meta.get('processes', 1)} process(es), matches CPU"}


# -- compression, evaluation, training -----------------------------------------------------------

def _experts(path: Path) -> int:
    from moe_slim.families import family_of
    from moe_slim.modeling.loading import load_config

    config = load_config(path)
    return int(family_of(config).num_experts(config))


def _keeps(plan: Path) -> list[list[int]]:
    return [layer["keep"] for layer in json.loads(plan.read_text())["layers"]]


def prune(s: Setup) -> dict[str, Any]:
    """Streamed prune from the device statistics; its plan must equal the plan from the CPU statistics."""
    args = ["prune", str(s.model), "--criterion", "reap", "--ratio", "0.5", "--quiet", "--overwrite"]
    res = cli([*args, "--stats", str(s.work / "stats-f32"), "--out", str(s.work / "pruned")], log=s.log)
    cli([*args, "--stats", str(s.work / "stats-cpu"), "--plan-only", "--out", str(s.work / "plan-cpu")], log=s.log)
    if _keeps(s.work / "pruned" / "plan.json") != _keeps(s.work / "plan-cpu" / "plan.json"):
        raise StepFailed("the plan from device statistics differs from the plan from CPU statistics")
    return _expect_half(s, s.work / "pruned", res["num_experts"], "plan equals CPU's")


def _expect_half(s: Setup, out: Path, experts: int, detail: str) -> dict[str, Any]:
    got = _experts(out)
    if got != round(experts * 0.5):
        raise StepFailed(f"{out.name} has {got} experts per layer, expected {round(experts * 0.5)}")
    return {"detail": f"{experts} -> {got} experts; {detail}"}


def merge(s: Setup, method: str, device: str, out: str) -> dict[str, Any]:
    """HC-SMoE from the observed samples, or sequential REAM from calibration text, computing on ``device``."""
    z = s.sizes
    args = ["merge", str(s.model), "--method", method, "--ratio", "0.5", "--max-tokens", z["merge_tokens"],
            "--align-tokens", z["merge_tokens"], "--device", device, "--out", str(s.work / out), "--quiet",
            "--overwrite"]
    if method == "ream":
        args += ["--calib", s.calib, "--data-dir", str(s.data), "--sequential", "--seq-len", z["seq_len"],
                 "--batch-size", z["batch"]]
    else:
        args += ["--stats", str(s.work / "stats-f32")]
    t = time.perf_counter()
    res = cli(args, log=s.log)
    s.seconds[out] = time.perf_counter() - t
    detail = "compute " + device
    if out.endswith("-cpu"):
        same = _groups(s.work / out) == _groups(s.work / out.removesuffix("-cpu"))
        detail += f"; groups {'equal' if same else 'differ from'} the device run's"
    return _expect_half(s, s.work / out, res["num_experts"], detail)


def _groups(out: Path) -> list[Any]:
    return [layer.get("groups") for layer in json.loads((out / "plan.json").read_text())["layers"]]


def mone(s: Setup) -> dict[str, Any]:
    res = cli(["mone", str(s.model), "--stats", str(s.work / "stats-f32"), "--ratio", "0.5", "--overwrite",
               "--out", str(s.work / "mone")], log=s.log)
    if any(k != round(res["num_experts"] * 0.5) for k in res["kept_per_layer"]):
        raise StepFailed(f"kept per layer {res['kept_per_layer']}")
    return {"detail": f"kept {res['kept_per_layer'][0]} of {res['num_experts']} experts per layer"}


def evaluate(s: Setup, device: str, out: str) -> dict[str, Any]:
    """Batched greedy translation; generated tokens counted at the model's one-token decode steps."""
    z = s.sizes
    counter = {"tokens": 0}

    def count(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if type(module).__name__.endswith("ForCausalLM") and torch.is_tensor(ids) and ids.shape[-1] == 1:
            counter["tokens"] += ids.shape[0]

    try:
        handle = torch.nn.modules.module.register_module_forward_hook(count, with_kwargs=True)
    except TypeError:  # a torch without keyword hooks: no token count, the rest still runs
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        cli(["eval", str(s.model), "--data-dir", str(s.data), "--tasks", "translation", "--limit", z["limit"],
             "--batch-size", "16", "--device", device, "--quiet", "--overwrite", "--out", str(s.work / out)],
            log=s.log)
    finally:
        handle.remove()
    results = json.loads((s.work / out).read_text())
    n, seconds = results["tasks"]["translation"]["n"], results["timings_s"]["translation"]
    if n != 3 * int(z["limit"]):
        raise StepFailed(f"{n} sentences translated, expected {3 * int(z['limit'])}")
    s.seconds[out] = seconds
    detail = f"{n} sentences, {counter['tokens']} generated tokens in {results['model'].get('dtype')}"
    if out.endswith("-cpu"):
        mine = [h["hyp"] for h in results["tasks"]["translation"]["hypotheses"]]
        other = json.loads((s.work / out.removesuffix("-cpu")).read_text())["tasks"]["translation"]["hypotheses"]
        same = sum(a == b["hyp"] for a, b in zip(mine, other))
        detail += f"; {same}/{n} hypotheses equal the device run's"
    return {"tokens_per_s": counter["tokens"] / seconds if seconds and counter["tokens"] else None, "detail": detail}


def sft(s: Setup, device: str, out: str) -> dict[str, Any]:
    z = s.sizes
    res = cli(["sft", str(s.model), "--data-dir", str(s.data), "--mix", "translation=0.5,general=0.5",
               "--steps", z["steps"], "--batch-size", "4", "--seq-len", z["seq_len"], "--chrf-limit", "0",
               "--val-examples", "8", "--patience", "0", "--device", device, "--quiet", "--overwrite",
               "--out", str(s.work / out)], log=s.log)
    info = json.loads((s.work / out / "sft.json").read_text())
    losses = [h["train_loss"] for h in info["history"] if "train_loss" in h]
    if info["steps"] != int(z["steps"]) or not losses or not all(math.isfinite(x) for x in losses):
        raise StepFailed(f"{info['steps']} steps, train losses {losses}")
    s.seconds[out] = info["seconds"]
    return {"tokens_per_s": info["tokens"] / info["seconds"] if info["seconds"] else None,
            "detail": f"{info['steps']} steps ({res['mode']}), loss {losses[0]:.3f} -> {losses[-1]:.3f}"}


def speed_rows(s: Setup) -> None:
    """GPU/CPU speed of the same work: CPU seconds / device seconds (observation: the loop alone)."""
    pairs = [("observe float32, whole model", "stats-f32", "stats-cpu"), ("merge hc-smoe", "hc-smoe", "hc-smoe-cpu"),
             ("eval translation", "eval.json", "eval-cpu.json"), ("sft", "sft", "sft-cpu")]
    s.figures.speed = []
    for work, dev, cpu in pairs:
        d, c = s.seconds.get(dev), s.seconds.get(cpu)
        ratio = c / d if d and c and s.device != "cpu" else None
        s.figures.speed.append(dict(work=work, device_s=d, cpu_s=c if s.device != "cpu" else None,
                                    device_over_cpu_speed=ratio))
