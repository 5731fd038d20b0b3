"""One prepared device check: every CUDA path of moe_slim run, timed and compared with a CPU run.

    python bench/device/check.py FIGURES_DIR [--cpu] [--work DIR] [--budget SECONDS]

On a GPU (the default) it builds a tiny model of every family and a generated Qwen3-MoE of ~2 GB
(bf16, the memory benchmarks' generator), then runs observe in float32 and bf16 (whole model,
layer-wise, ``--device-map auto``, under ``torchrun``), prune (streamed), merge (HC-SMoE, REAM) with
GPU compute, MoNE, eval (batched generation) and a few SFT steps; statistics are checked against a
float32 CPU run of the same inputs, and the CPU runs of the same merge, eval and SFT, last, give the
GPU/CPU speed ratios. ``--cpu`` runs the same steps on the tiny models on the CPU (the CI dry run).
Prints one PASS/FAIL/SKIP line per step; writes steps.tsv, compare.tsv, speed.tsv, environment.json,
summary.txt and log.txt into FIGURES_DIR; exits 1 when any step did not pass.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
for _var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_var, "1")  # progress bars of 60 loads and saves would bury the PASS lines

import torch  # noqa: E402

import steps  # noqa: E402
from runner import Figures, Runner, StepFailed  # noqa: E402


def environment(s: steps.Setup, mode: str) -> dict[str, Any]:
    """What ran where; fails when the device is missing or transformers is not the pinned release."""
    import importlib.metadata as md
    import subprocess

    sys.path.insert(0, str(steps.BENCH / "device"))
    from wheels import read_pins

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "mode": mode,
        "device": s.device, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpus": os.cpu_count(), "platform": platform.platform(),
    }
    for name in ("transformers", "accelerate", "safetensors", "lm_eval", "pydantic", "datasets", "peft"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if s.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StepFailed("no CUDA device (run with --cpu for the CPU dry run)")
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
            env["driver"] = q.stdout.strip() or None
    s.figures.environment = env
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    env["pip_check"] = check.stdout.strip().splitlines()  # told, not judged: the steps below judge
    s.log.write(f"$ pip check\n{check.stdout}{check.stderr}")
    import datasets  # noqa: F401
    import lm_eval  # noqa: F401  (what eval needs; the image lacks it without the carried wheels)
    import pydantic  # noqa: F401

    import moe_slim.api  # noqa: F401

    pinned = read_pins(steps.ROOT / "constraints.txt").get("transformers")
    if env["transformers"] != pinned:
        raise StepFailed(f"transformers {env['transformers']} runs, constraints.txt pins {pinned} "
                         "(install the wheels from bench/device_check_prepare.sh)")
    where = env.get("card", "CPU")
    return {"detail": f"{where}, torch {torch.__version__}, transformers {env['transformers']}"}


def plan(s: steps.Setup, run: Runner) -> None:
    """Every step in order; each line's limit (seconds) holds for the big model, the tiny one is faster."""
    from moe_slim.modeling.tiny import TINY_FAMILIES

    dev, big = s.device, s.big
    run.run("env", 60, lambda: environment(s, "gpu" if dev != "cpu" else "cpu"))
    if run.failed():
        return
    run.run("build", 150 if big else 60, lambda: steps.build(s))
    for family in TINY_FAMILIES:
        run.run(f"tiny-observe:{family}", 30, lambda f=family: steps.tiny_family(s, f))
    o = 60 if big else 20
    run.run("observe-reference-cpu-float32", 120 if big else 20,
            lambda: steps.observe(s, "stats-cpu", ["--device", "cpu", "--dtype", "float32", "--no-layerwise"],
                                  "float32", compare=False))
    for name, dtype, extra in (("stats-f32", "float32", ["--no-layerwise"]),
                               ("stats-bf16", "bfloat16", ["--no-layerwise"]),
                               ("stats-layerwise-f32", "float32", ["--layerwise"]),
                               ("stats-layerwise-bf16", "bfloat16", ["--layerwise"])):
        run.run(f"observe-{dev}-{name.removeprefix('stats-')}", o,
                lambda n=name, d=dtype, e=extra: steps.observe(s, n, ["--device", dev, "--dtype", d, *e], d))
    run.run("observe-device-map-auto", o,
            lambda: steps.observe(s, "stats-device-map", ["--device-map", "auto", "--dtype", "float32",
                                                          "--no-layerwise"], "float32"))
    run.run("observe-torchrun", 120 if big else 60, lambda: steps.observe_torchrun(s))
    run.run("prune-stream", o, lambda: steps.prune(s))
    run.run("merge-hc-smoe", 90 if big else 20, lambda: steps.merge(s, "hc-smoe", dev, "hc-smoe"))
    run.run("merge-ream-sequential", 120 if big else 20, lambda: steps.merge(s, "ream", dev, "ream"))
    run.run("mone", o, lambda: steps.mone(s))
    run.run("eval-translation", 90 if big else 30, lambda: steps.evaluate(s, dev, "eval.json"))
    run.run("sft", 90 if big else 30, lambda: steps.sft(s, dev, "sft"))
    if dev != "cpu":  # the same work on the CPU: the speed ratios (last, so a short budget loses only these)
        run.run("cpu:merge-hc-smoe", 90, lambda: steps.merge(s, "hc-smoe", "cpu", "hc-smoe-cpu"))
        run.run("cpu:eval-translation", 90, lambda: steps.evaluate(s, "cpu", "eval-cpu.json"))
        run.run("cpu:sft", 120, lambda: steps.sft(s, "cpu", "sft-cpu"))
    steps.speed_rows(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("figures", help="folder for the figures (at most 8 files)")
    ap.add_argument("--cpu", action="store_true", help="tiny models only, on the CPU (the CI dry run)")
    ap.add_argument("--device", default=None, help="device of the device paths (default: cuda; cpu with --cpu)")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                    help="run the compression steps on the generated ~2 GB MoE (default: on a GPU)")
    ap.add_argument("--big-layers", type=int, default=8, help="decoder layers of the generated MoE (8: 1.85 GB)")
    ap.add_argument("--work", default=None, help="where checkpoints are built (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default 450 on a GPU, 110 with --cpu)")
    ap.add_argument("--limit-scale", type=float, default=1.0,
                    help="multiply every step's time limit (to run the GPU plan on a CPU, say)")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.cpu else "cuda")
    big = args.big if args.big is not None else not args.cpu
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"moe_slim_device_check_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    figures = Figures(Path(args.figures))
    figures.out.mkdir(parents=True, exist_ok=True)
    log = open(figures.out / "log.txt", "w")  # every command's messages and every traceback
    s = steps.Setup(device=device, big=big, work=work, figures=figures, big_layers=args.big_layers, log=log)
    run = Runner(figures, args.budget or (110.0 if args.cpu else 450.0), log=log, limit_scale=args.limit_scale)
    try:
        plan(s, run)
    finally:
        figures.write()
        log.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    bad = [r.step for r in figures.results if r.status != "PASS"]
    print(f"device check: {len(figures.results) - len(bad)} of {len(figures.results)} steps passed"
          + (f"; not passed: {', '.join(bad)}" if bad else "") + f"; figures in {figures.out}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
