"""Peak memory of pruning a ~1.85 GB checkpoint: streaming rewrite vs loading the model.

Builds a randomly initialised Qwen3-MoE in bfloat16 (Qwen3's vocabulary of 151,936 tokens, 8 layers x
96 experts, top-8; ~0.93B parameters) saved in shards of at most 300 MB, observes 2k tokens once, then
runs the real command ``moe-slim prune --ratio 0.5`` twice in subprocesses: streaming (the default)
and ``--in-memory``. For each it prints peak RSS (``/usr/bin/time``), wall time, output bytes and
output dtypes, and last the ratio of the streamed peak to the largest single tensor of the source.

Goal (issue #14): streamed peak <= largest tensor + 300 MB; output bytes ~ input bytes x
(1 - 0.5 x the experts' share of the bytes); bfloat16 kept.

    python bench/bench_rewrite_memory.py [--work /tmp/moe_slim_bench_rewrite] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from memory_common import run, source_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/moe_slim_bench_rewrite")
    ap.add_argument("--keep", action="store_true", help="keep the generated model for the next run")
    ap.add_argument("--family", default="qwen3_moe", choices=("qwen3_moe", "qwen3_next"),
                    help="qwen3_next: the same sizes in a hybrid linear-attention stack")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from moe_slim.modeling.shards import ShardedCheckpoint

    work = Path(args.work)
    src = source_model(work, family=args.family)
    ck = ShardedCheckpoint(src)
    largest = max(ck.entries.values(), key=lambda e: e.nbytes)
    expert_bytes = sum(e.nbytes for k, e in ck.entries.items() if ".mlp.experts." in k)
    shards = sorted({e.file.name for e in ck.entries.values()})
    print(f"source: {ck.total_bytes / 1e9:.2f} GB in {len(shards)} shards (largest shard "
          f"{max(f.stat().st_size for f in src.glob('*.safetensors')) / 1e6:.0f} MB); largest tensor "
          f"{largest.name} {largest.nbytes / 1e6:.0f} MB; experts hold {expert_bytes / ck.total_bytes:.1%} of the bytes")

    moe = [sys.executable, "-m", "moe_slim"]
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                             for i in range(200)))
    stats = work / "stats"
    if not (stats / "meta.json").is_file():
        rss, wall = run([*moe, "observe", str(src), "--calib", f"general={calib}", "--max-tokens", "2k",
                         "--seq-len", "256", "--out", str(stats), "--quiet", "--overwrite"])
        print(f"observe (2k tokens, whole model in float32, not part of the comparison): {rss:.0f} MB, {wall:.0f}s")

    expected = ck.total_bytes * (1 - 0.5 * expert_bytes / ck.total_bytes)
    rows = []
    for name, extra in (("streaming", []), ("in-memory", ["--in-memory"])):
        out = work / f"pruned-{name}"
        shutil.rmtree(out, ignore_errors=True)
        rss, wall = run([*moe, "prune", str(src), "--stats", str(stats), "--criterion", "reap", "--ratio", "0.5",
                         "--max-shard-size", "300MB", "--out", str(out), "--quiet", *extra])
        oc = ShardedCheckpoint(out)
        dtypes = sorted({e.dtype for e in oc.entries.values()})
        rows.append((name, rss, wall, oc.total_bytes, dtypes))
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{'path':10s} {'peak RSS':>10s} {'wall':>7s} {'output':>10s} {'expected':>10s}  dtype")
    for name, rss, wall, nbytes, dtypes in rows:
        print(f"{name:10s} {rss:8.0f} MB {wall:6.1f}s {nbytes / 1e9:8.3f} GB {expected / 1e9:8.3f} GB  {','.join(dtypes)}")
    stream_rss = rows[0][1]
    print(f"\nstreamed peak - largest tensor: {stream_rss - largest.nbytes / 2**20:.0f} MB (goal <= 300 MB)")
    print(f"in-memory peak / streamed peak: {rows[1][1] / stream_rss:.2f}")
    print(f"ratio streamed peak RSS / largest tensor: {stream_rss / (largest.nbytes / 2**20):.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
