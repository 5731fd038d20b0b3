"""Where one MoE layer's merge time goes: CPU seconds per stage of REAM and HC-SMoE, in process.

Complements ``bench_merge_memory.py --profile`` (the real commands, wall time per layer): this profiles
``merge_model`` with ``cProfile`` on CPU time (``time.process_time``, so other processes' load counts
less), on an in-memory Qwen3-MoE with the generated benchmark checkpoint's expert shapes (H = 768,
I = 384, 96 experts, top-8; one layer, small vocabulary) and the same synthetic calibration text,
``--tokens`` sample tokens, one torch thread. ``--reps`` rounds alternate the methods.

    python bench/bench_ream_breakdown.py [--tokens 2000] [--reps 2]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # (file suffix, function) -> label
    ("merge/features.py", "layer_features"): "expert outputs (features)",
    ("merge/runner.py", "hidden"): "REAM: activations for alignment",
    ("merge/options.py", "pca_rows"): "REAM: PCA per pair",
    ("merge/align.py", "ream_cost"): "REAM: cost matrices",
    ("merge/align.py", "align"): "REAM: Hungarian",
    ("merge/grouping.py", "group_hc"): "HC-SMoE: clustering",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--methods", default="hc-smoe,ream")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memory_common import write_calib
    from moe_slim.experts.merge.driver import merge_model
    from moe_slim.experts.observe import observe
    from moe_slim.modeling.dispatch import prepare_model
    from moe_slim.modeling.tiny import tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tok), hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
        num_hidden_layers=1, num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=96,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = prepare_model(AutoModelForCausalLM.from_config(config))
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        lines = write_calib(Path(tmp) / "calib.jsonl", 400).read_text().splitlines()
    texts = {"general": [json.loads(line)["text"] for line in lines]}
    stats = observe(model, tok, texts, seq_len=256, batch_size=4, samples=args.tokens, max_tokens=args.tokens)
    methods = args.methods.split(",")
    totals: dict[str, list[float]] = {m: [] for m in methods}
    stages: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for r in range(args.reps):
        for method in methods if r % 2 == 0 else methods[::-1]:
            prof = cProfile.Profile(time.process_time)
            t0 = time.process_time()
            prof.enable()
            merge_model(copy.deepcopy(model), stats, method, 0.5, max_tokens=args.tokens)
            prof.disable()
            totals[method].append(time.process_time() - t0)
            for (file, _, fn), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
                label = next((v for (f, n), v in STAGES.items() if file.endswith(f) and fn == n), None)
                if label:
                    stages[method].setdefault(label, []).append(row[3])  # cumulative time
    print(f"one layer, {args.tokens} sample tokens, one thread, {args.reps} rounds; CPU seconds (median over rounds)")
    for m in methods:
        total = statistics.median(totals[m])
        print(f"{m:8s} total {total:6.2f} s")
        for label, ts in stages[m].items():
            t = statistics.median(ts)
            print(f"  {label:34s} {t:6.2f} s ({100 * t / total:4.1f}%)")
    a, *rest = methods
    for b in rest:
        ratios = sorted(tb / ta for ta, tb in zip(totals[a], totals[b]))
        print(f"{b} / {a}: {statistics.median(totals[b]) / statistics.median(totals[a]):.2f} (per round "
              f"{' '.join(f'{x:.2f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
