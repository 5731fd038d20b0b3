"""Peak memory of distillation recovery at size: the teacher streamed one layer at a time into a top-k cache,
against the student trained alone and against the teacher held whole beside it.

A generated Qwen3-MoE teacher (``memory_common``: bf16, ``--layers`` layers x 96 experts, vocabulary 151,936,
>= 1 GB) and a student of the same shape with half the experts (48: what pruning 50% leaves; generated, as
memory not quality is measured). Three real ``moe-slim sft`` commands in subprocesses, float32 on CPU, the
same steps and batches, peak RSS from ``/usr/bin/time``:

1. ``--loss ce``: the student's training memory alone;
2. ``--teacher T`` (on the fly): the teacher loaded whole beside the student;
3. ``--teacher T --layerwise-teacher --teacher-cache C``: the teacher's top-64 per position computed one
   teacher layer at a time and cached, then the student trained alone on the cache.

Goal (issue #33 item 3): peak of 3 <= peak of 1 + one teacher layer in float32.

    python bench/bench_sft_memory.py [--work /tmp/moe_slim_bench_sft] [--layers 4] [--steps 2] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from memory_common import build_model, run, source_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/moe_slim_bench_sft")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the generated teacher (4: ~1.1 GB)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--mode", default="experts")
    ap.add_argument("--keep", action="store_true", help="keep the generated models for the next run")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from moe_slim.modeling.shards import ShardedCheckpoint

    work = Path(args.work)
    teacher = source_model(work, args.layers)
    student = work / "student"
    if not (student / "config.json").is_file():
        build_model(student, args.layers, experts=48)
    t, s = ShardedCheckpoint(teacher), ShardedCheckpoint(student)
    layer0 = sum(e.nbytes for k, e in t.entries.items() if k.startswith("model.layers.0.")) * 2  # bf16 -> float32
    print(f"teacher {t.total_bytes / 1e9:.2f} GB bf16, student {s.total_bytes / 1e9:.2f} GB bf16; "
          f"one teacher layer {layer0 / 1e6:.0f} MB in float32")
    common = [sys.executable, "-m", "moe_slim", "sft", str(student), "--mix", "translation=0.8,general=0.2",
              "--data-dir", str(ROOT / "data"), "--steps", str(args.steps), "--batch-size", "1", "--seq-len", "32",
              "--val-examples", "2", "--eval-every", str(args.steps), "--chrf-limit", "0", "--mode", args.mode,
              "--device", "cpu", "--quiet", "--overwrite"]
    cases = {
        "student alone (ce)": ["--loss", "ce"],
        "teacher whole, on the fly (kd)": ["--teacher", str(teacher)],
        "teacher layer-wise, top-64 cache (kd)": ["--teacher", str(teacher), "--layerwise-teacher",
                                                  "--teacher-cache", str(work / "teacher.safetensors")],
    }
    peaks = {}
    print(f"\n| case | peak RSS (MB) | wall (s) |\n|---|---|---|")
    for case, extra in cases.items():
        (work / "teacher.safetensors").unlink(missing_ok=True)
        rss, wall = run([*common, *extra, "--out", str(work / "out")])
        peaks[case] = rss
        print(f"| {case} | {rss:.0f} | {wall:.0f} |", flush=True)
    alone, whole, cached = peaks.values()
    print(f"\nlayer-wise cache / (student alone + one teacher layer) = {cached / (alone + layer0 / 2**20):.2f} "
          f"(goal <= 1); teacher whole / same = {whole / (alone + layer0 / 2**20):.2f}; "
          f"cache size {(work / 'teacher.safetensors').stat().st_size / 1e6:.1f} MB for {args.steps} steps")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
