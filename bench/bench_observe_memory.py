"""Peak memory of observing a ~1.85 GB checkpoint: layer-wise vs the whole model, same statistics.

Uses the generated Qwen3-MoE of ``bench_rewrite_memory.py`` (bf16, 151,936-token vocabulary, 8 layers
x 96 experts, top-8, shards <= 300 MB) and runs the real command ``moe-slim observe`` on 16k tokens
twice in subprocesses, float32 on CPU: ``--no-layerwise`` (the whole model loaded) and ``--layerwise``
(one layer in memory at a time). Prints each run's peak RSS (``/usr/bin/time``) and wall time, the
largest difference between the two statistics, and last the ratio layer-wise peak / whole-model peak.

Goal (issue #15): ratio <= 0.35 with at most 1.5x the time.

    python bench/bench_observe_memory.py [--work /tmp/moe_slim_bench_observe] [--tokens 16k] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from memory_common import run, source_model, write_calib

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/moe_slim_bench_observe")
    ap.add_argument("--tokens", default="16k")
    ap.add_argument("--keep", action="store_true", help="keep the generated model for the next run")
    ap.add_argument("--family", default="qwen3_moe", choices=("qwen3_moe", "qwen3_next"),
                    help="qwen3_next: the same sizes in a hybrid linear-attention stack")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from moe_slim.experts.stats import RouterStats
    from moe_slim.modeling.shards import ShardedCheckpoint

    work = Path(args.work)
    src = source_model(work, family=args.family)
    ck = ShardedCheckpoint(src)
    layer0 = sum(e.nbytes for k, e in ck.entries.items() if k.startswith("model.layers.0."))
    print(f"source: {ck.total_bytes / 1e9:.2f} GB bf16 ({ck.total_bytes / 2 * 4 / 1e9:.2f} GB in float32); "
          f"one layer {layer0 / 1e6:.0f} MB bf16")
    calib = write_calib(work / "calib.jsonl", 4000)
    moe = [sys.executable, "-m", "moe_slim", "observe", str(src), "--calib", f"general={calib}",
           "--max-tokens", args.tokens, "--seq-len", "512", "--batch-size", "8", "--device", "cpu", "--quiet"]
    rows = {}
    for name, extra in (("whole model", ["--no-layerwise"]), ("layer-wise", ["--layerwise"])):
        out = work / f"stats-{name.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        rss, wall = run([*moe, *extra, "--out", str(out)])
        rows[name] = (rss, wall, RouterStats.load(out))
    a, b = rows["whole model"][2], rows["layer-wise"][2]
    diff = max(float((t - b.domains[d][f]).abs().max()) for d in a.domains for f, t in a.domains[d].items())
    counts_equal = all(torch.equal(a.domains[d]["count"], b.domains[d]["count"]) for d in a.domains)
    tokens = int(a.meta["tokens_per_domain"]["general"])
    print(f"\n{'path':12s} {'peak RSS':>10s} {'wall':>8s}   ({tokens} tokens)")
    for name, (rss, wall, _) in rows.items():
        print(f"{name:12s} {rss:8.0f} MB {wall:7.1f}s")
    print(f"\nmax |difference| between the two statistics: {diff:.3g} (counts equal: {counts_equal})")
    print(f"time layer-wise / whole model: {rows['layer-wise'][1] / rows['whole model'][1]:.2f} (goal <= 1.5)")
    print(f"ratio peak RSS layer-wise / whole model: {rows['layer-wise'][0] / rows['whole model'][0]:.2f} (goal <= 0.35)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
