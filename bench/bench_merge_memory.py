"""Peak memory of merging a ~1.85 GB checkpoint's experts: at size (one MoE layer in memory) vs loaded whole.

Uses the generated Qwen3-MoE of ``bench_rewrite_memory.py`` (bf16, 8 layers x 96 experts, top-8,
shards <= 300 MB). Runs the real commands in subprocesses, float32 compute on CPU:
1. ``moe-slim observe --layerwise --samples`` on a small calibration text (the merge sample);
2. ``moe-slim merge --stats`` (HC-SMoE, 50%) at size and with ``--in-memory``;
3. ``moe-slim merge --calib --sequential`` (REAM, 50%) at size and with ``--in-memory``.
Prints peak RSS (``/usr/bin/time``), wall time, output bytes and dtype, whether the two paths wrote
the same tensors, and the ratio of the at-size peak to one MoE layer's experts in float32 (what
merging one layer has to hold) and to the in-memory peak.

Goal (issue #14 item 4, #15 item 2): peak at size <= one layer's experts in float32 + the largest
tensor + 1 GB of interpreter and libraries, far below the in-memory peak.

``--profile``: time per MoE layer of REAM against HC-SMoE, both ``merge --plan-only`` at size from the same
statistics (equal samples: ``--tokens`` per layer), read from the per-layer lines ``merge`` prints. On a
shared machine the load changes by the minute, so the methods run alternately, ``--reps`` rounds in
alternating order (ABBA...), each the real command in a subprocess (peak RSS, wall and CPU time); printed,
for wall and for CPU seconds per layer (``merge`` prints both): the median per-layer time of each, the
ratio of the medians, the per-layer ratios of the same layer in the same round (median and range) and the load average after each run.
Goal (issue #30 item 12): REAM <= 2x HC-SMoE per layer.

    python bench/bench_merge_memory.py [--work /tmp/moe_slim_bench_merge] [--tokens 2k] [--keep]
        [--profile [--reps 3] [--threads 1] [--layers 2]]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import re
import statistics

from memory_common import baseline_rss, run, run_with_output, source_model, write_calib

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/moe_slim_bench_merge")
    ap.add_argument("--tokens", default="2k")
    ap.add_argument("--keep", action="store_true", help="keep the generated model for the next run")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the generated model (8: ~1.85 GB)")
    ap.add_argument("--cases", default="hc-smoe from stats,ream sequential", help="comma-separated cases to run")
    ap.add_argument("--profile", action="store_true", help="only the per-layer time of REAM against HC-SMoE")
    ap.add_argument("--methods", default="hc-smoe,ream", help="with --profile: the methods (or presets) timed")
    ap.add_argument("--reps", type=int, default=3, help="with --profile: rounds of every method, alternating order")
    ap.add_argument("--threads", type=int, default=0, help="with --profile: OMP_NUM_THREADS of the commands (0: unset)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from moe_slim.modeling.shards import ShardedCheckpoint

    work = Path(args.work)
    src = source_model(work, args.layers)
    ck = ShardedCheckpoint(src)
    experts0 = sum(e.nbytes for k, e in ck.entries.items() if k.startswith("model.layers.0.mlp.experts."))
    largest = max(e.nbytes for e in ck.entries.values())
    print(f"source: {ck.total_bytes / 1e9:.2f} GB bf16; one layer's experts {experts0 / 1e6:.0f} MB bf16 "
          f"({experts0 * 2 / 1e6:.0f} MB float32); largest tensor {largest / 1e6:.0f} MB")
    from moe_slim.data.mixspec import parse_tokens

    # 60-word texts, ~60 tokens each: enough of them for --tokens (400 covers 8k; 32k needs more)
    calib = write_calib(work / "calib.jsonl", max(400, parse_tokens(args.tokens) // 40))
    moe = [sys.executable, "-m", "moe_slim"]
    common = ["--seq-len", "256", "--batch-size", "4", "--device", "cpu", "--quiet"]
    stats = work / "stats"
    if args.keep and (stats / "meta.json").is_file():
        print(f"reusing {stats} (--keep)")
    else:
        shutil.rmtree(stats, ignore_errors=True)
        rss, wall = run([*moe, "observe", str(src), "--calib", f"general={calib}", "--max-tokens", args.tokens,
                         "--samples", args.tokens, "--layerwise", "--out", str(stats), *common])
        print(f"observe --layerwise --samples {args.tokens}: {rss:.0f} MB, {wall:.1f}s")

    if args.profile:
        return profile(moe, src, stats, args, common)

    cases = {
        "hc-smoe from stats": ["--method", "hc-smoe", "--stats", str(stats)],
        "ream sequential": ["--method", "ream", "--calib", f"general={calib}", "--sequential",
                            "--max-tokens", args.tokens],
    }
    cases = {c: cases[c] for c in args.cases.split(",")}
    floor = baseline_rss()
    print(f"interpreter and libraries alone: {floor:.0f} MB")
    print(f"\n{'case':20s} {'path':10s} {'peak RSS':>10s} {'wall':>8s} {'output':>9s}  dtype")
    ratios = []
    for case, extra in cases.items():
        outs = {}
        for path, flag in (("at size", []), ("in memory", ["--in-memory"])):
            out = work / f"{case.replace(' ', '-')}-{path.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            rss, wall = run([*moe, "merge", str(src), "--ratio", "0.5", *extra, *flag, "--out", str(out),
                             "--max-shard-size", "300MB", *common])
            o = ShardedCheckpoint(out)
            dtypes = sorted({o.entry(k).dtype for k in o.keys})
            print(f"{case:20s} {path:10s} {rss:8.0f} MB {wall:7.1f}s {o.total_bytes / 1e9:7.3f}GB  {','.join(dtypes)}")
            outs[path] = (rss, o)
        a, b = outs["at size"][1], outs["in memory"][1]
        same = set(a.keys) == set(b.keys) and all(torch.equal(a.tensor(k), b.tensor(k)) for k in a.keys)
        print(f"{'':20s} same tensors on both paths: {same}")
        ratios.append((case, outs["at size"][0], outs["in memory"][0]))
    for case, at, mem in ratios:
        print(f"{case}: peak at size / one layer's experts in float32 = {at * 1e6 / (experts0 * 2):.2f}; "
              f"(peak - largest tensor - 1 GB) / one layer's experts f32 = "
              f"{(at * 1e6 - largest - 1e9) / (experts0 * 2):.2f} (goal <= 1); (peak - libraries) / one layer's "
              f"experts f32 = {(at - floor) * 1e6 / (experts0 * 2):.2f}; at size / in memory = {at / mem:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


LAYER_LINE = re.compile(r"^(\S+): (\d+) -> (\d+) experts \((\d+) sample tokens, ([\d.]+)s, ([\d.]+)s CPU\)$", re.M)


def profile(moe: list[str], src: Path, stats: Path, args: argparse.Namespace, common: list[str]) -> int:
    """Seconds per MoE layer of each method at size from the same statistics (``merge`` prints one line a
    layer), the methods run alternately (ABBA...) ``--reps`` times so a changing load falls on both."""
    work = Path(args.work)
    quiet = [c for c in common if c != "--quiet"]
    methods = args.methods.split(",")
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    wall: dict[str, list[list[float]]] = {m: [] for m in methods}  # [round][layer]
    cpu: dict[str, list[list[float]]] = {m: [] for m in methods}
    loads = [os.getloadavg()[0]]
    print(f"{os.cpu_count()} cores; torch threads: {args.threads or 'default'}; {args.reps} rounds, order alternating")
    for r in range(args.reps):
        for method in methods if r % 2 == 0 else methods[::-1]:
            out = work / f"profile-{method}"
            shutil.rmtree(out, ignore_errors=True)
            m = run_with_output([*moe, "merge", str(src), "--ratio", "0.5", "--method", method, "--stats", str(stats),
                                 "--max-tokens", args.tokens, "--plan-only", "--out", str(out), *quiet], env)
            loads.append(os.getloadavg()[0])
            rows = LAYER_LINE.findall(m.stdout)
            wall[method].append([float(row[4]) for row in rows])
            cpu[method].append([float(row[5]) for row in rows])
            print(f"round {r + 1} {method:10s} {len(rows)} layers, {rows[0][3] if rows else '?'} sample tokens each: "
                  f"per layer {' '.join(f'{t:.1f}' for t in wall[method][-1])} s wall, "
                  f"{' '.join(f'{t:.1f}' for t in cpu[method][-1])} s CPU; whole command {m.wall:.0f}s wall, "
                  f"{m.cpu:.0f}s CPU, peak {m.rss:.0f} MB; load {loads[-1]:.1f}", flush=True)
    print(f"load average (1 min) at the start and after each run: {' '.join(f'{x:.1f}' for x in loads)}")
    for what, times in (("wall", wall), ("CPU", cpu)):
        flat = {m: [t for rep in times[m] for t in rep] for m in methods}
        for m in methods:
            print(f"{m:10s} per layer, {what}: median {statistics.median(flat[m]):.1f} s, range {min(flat[m]):.1f}-"
                  f"{max(flat[m]):.1f} s (n = {len(flat[m])}: {args.reps} runs x {len(times[m][0])} layers)")
        a = methods[0]
        for b in methods[1:]:
            ratio = statistics.median(flat[b]) / statistics.median(flat[a])
            paired = sorted(tb / ta for ra, rb in zip(times[a], times[b]) for ta, tb in zip(ra, rb))
            print(f"{b} / {a} per layer, {what}: ratio of medians {ratio:.2f}; same layer, same round: median "
                  f"{statistics.median(paired):.2f}, range {paired[0]:.2f}-{paired[-1]:.2f} (n = {len(paired)}); "
                  f"goal <= 2: {'met' if ratio <= 2 else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
