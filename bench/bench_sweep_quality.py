"""Sweep quality targets on the reference MoE (models/reference/).

Targets (chrF on the translation test split, pruning calibrated on translation text):

* translation-calibrated pruning keeps >= 98% of the baseline chrF at 50% of experts removed;
* ... and >= 90% at 75% removed;
* at 50%, translation-calibrated beats general-calibrated on chrF.

Runs as a sweep (resumable, results in runs/bench-sweep-quality/results.db) and prints every
figure with its margin to the target. Usage:

    OMP_NUM_THREADS=2 python bench/bench_sweep_quality.py [--limit 50] [--methods reap,task_contrast] [--jobs 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moe_slim.reference.recipe import REFERENCE_DIR
from moe_slim.sweep.report import pivot
from moe_slim.sweep.run import run_sweep
from moe_slim.sweep.spec import parse_spec
from moe_slim.sweep.store import read_rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REFERENCE_DIR))
    ap.add_argument("--data", default="data")
    ap.add_argument("--limit", type=int, default=50, help="translation sentences per language pair")
    ap.add_argument("--methods", default="reap,task_contrast,frequency")
    ap.add_argument("--out", default="runs/bench-sweep-quality")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        print(f"no reference model at {args.model} (train it with `moe-slim reference train`)")
        return 1
    methods = [m for m in args.methods.split(",") if m]
    spec = parse_spec({
        "name": "bench-sweep-quality", "model": args.model, "data_dir": args.data,
        "calibration": {"domains": ["general", "math", "code", "translation"], "texts_per_domain": 128,
                        "max_tokens": "16k", "seq_len": 256, "batch_size": 8},
        "mixes": [{"translation": 1}, {"general": 1}],
        "methods": methods, "ratios": [0.5, 0.75], "budgets": ["uniform"],
        "eval": {"suite": "quick", "tasks": ["translation"], "limit": args.limit},
    })
    t = time.perf_counter()
    run_sweep(spec, args.out, jobs=args.jobs)
    rows, _ = read_rows(Path(args.out) / "results.db")
    print(f"\nsweep done in {time.perf_counter() - t:.0f}s; {args.limit} sentences per pair\n")
    print(pivot(rows, "chrf"))
    base = next(r for r in rows if r["kind"] == "baseline")["chrf"]

    def chrf(method: str, mix: str, ratio: float) -> float:
        return next(r["chrf"] for r in rows if r["method"] == method and r["mix"] == mix and r["ratio"] == ratio)

    print(f"\nbaseline chrF {base:.2f}")
    ok_all = True
    for m in methods:
        t50, t75 = chrf(m, "translation=1", 0.5), chrf(m, "translation=1", 0.75)
        g50 = chrf(m, "general=1", 0.5)
        checks = [
            (f"{m}: translation-calibrated @50% keeps >= 98% of baseline chrF", t50 / base, 0.98,
             f"{t50:.2f} = {100 * t50 / base:.1f}%"),
            (f"{m}: translation-calibrated @75% keeps >= 90% of baseline chrF", t75 / base, 0.90,
             f"{t75:.2f} = {100 * t75 / base:.1f}%"),
            (f"{m}: @50% translation-calibrated beats general-calibrated", t50 - g50, 1e-9,
             f"{t50:.2f} vs {g50:.2f} ({t50 - g50:+.2f} chrF)"),
        ]
        for name, value, target, text in checks:
            passed = value >= target
            ok_all &= passed or m != "reap"
            if passed:
                miss = ""
            elif "beats" in name:
                miss = f"  MISSED by {target - value:.2f} chrF"
            else:
                miss = f"  MISSED by {100 * (target - value):.1f} percentage points of baseline chrF"
            print(f"  [{'ok' if passed else '--'}] {name}: {text}{miss}")
    return 0 if ok_all else 2


if __name__ == "__main__":
    sys.exit(main())
