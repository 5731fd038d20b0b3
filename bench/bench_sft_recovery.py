"""Does a short SFT heal heavy expert pruning? REAP pruning for translation, then ``moe_slim.sft``.

On the reference MoE (``models/reference/``): observe the calibration split of every domain
(``moe_slim.reference.calibration_texts``), plan with REAP on the translation mix
(``api.plan_for(criterion="reap", mix={"translation": 1})``), prune 75% and 87.5% of the experts
(``apply_plan``), then fine-tune each pruned model for at most ``--steps`` optimizer steps and
``--max-minutes`` on CPU (``sft`` with early stopping on validation loss). chrF is measured with
``evaluate(tasks=["translation"], limit=--limit)`` (sentences per language pair, the same for every
row) on the unpruned model, each pruned model before SFT and after it.

Target: chrF after SFT at 75% pruned >= the unpruned model's, shown by the paired-bootstrap interval of the
difference (same sentences) lying at or above 0.

    OMP_NUM_THREADS=1 python bench/bench_sft_recovery.py [--ratios 0.75,0.875] [--steps 300] [--limit 40]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from figures import difference_text
from moe_slim.api import plan_for
from moe_slim.evals.run import evaluate
from moe_slim.evals.translation import compare_results
from moe_slim.experts.observe import observe
from moe_slim.experts.prune import apply_plan, count_parameters
from moe_slim.modeling.loading import load_model
from moe_slim.recover.loop import sft
from moe_slim.reference.card import calibration_texts
from moe_slim.reference.recipe import REFERENCE_DIR


def translate(model, tok, data: str, limit: int, baseline: dict | None = None) -> dict:
    """The quick suite's translation task; with ``baseline``, its paired bootstrap against those hypotheses."""
    return evaluate(model, tok, "quick", data_dir=data, tasks=["translation"], limit=limit, hash_weights=False,
                    baseline=baseline)


def chrf_of(res: dict) -> float:
    return float(res["metrics"]["translation/chrf"])


def delta_of(cmp: dict) -> dict:
    c = cmp["overall"]["chrf"]
    return {"delta": round(c["delta"], 2), "ci95": [round(x, 2) for x in c["delta_ci95"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_DIR))
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--ratios", default="0.75,0.875")
    ap.add_argument("--limit", type=int, default=40, help="translation sentences per pair for chrF")
    ap.add_argument("--calib-per-domain", type=int, default=300)
    ap.add_argument("--mix", default="translation=0.8,general=0.2", help="SFT data mix")
    ap.add_argument("--mode", default="experts")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=15.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not (Path(args.model) / "config.json").is_file():
        print(f"bench_sft_recovery: no model at {args.model} (train it with `moe-slim train-reference`)",
              file=sys.stderr)
        return 1

    model, tok = load_model(args.model)
    t0 = time.perf_counter()
    stats = observe(model, tok, calibration_texts(args.data, args.calib_per_domain), seq_len=256)
    print(f"observed calibration in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    base = translate(model, tok, args.data, args.limit)
    base_chrf, n = chrf_of(base), int(base["metrics"]["translation/n"])
    print(f"unpruned chrF {base_chrf:.2f} (n {n}; {time.perf_counter() - t0:.0f}s)")
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        pruned = copy.deepcopy(model)
        plan = plan_for(pruned, stats, criterion="reap", ratio=ratio, mix={"translation": 1})
        apply_plan(pruned, plan)
        before_res = translate(pruned, tok, args.data, args.limit, baseline=base)
        before = chrf_of(before_res)
        print(f"{ratio:.1%} pruned: chrF {before:.2f} before SFT; {count_parameters(pruned):,} parameters")
        res = sft(pruned, tok, args.mix, data_dir=args.data, steps=args.steps, mode=args.mode, lr=args.lr,
                  batch_size=args.batch_size, grad_accum=args.grad_accum, eval_every=args.eval_every, patience=args.patience, seed=args.seed,
                  max_minutes=args.max_minutes, merge_lora=True, progress=sys.stderr.isatty())
        after_res = translate(res.model, tok, args.data, args.limit, baseline=base)
        after = chrf_of(after_res)
        gain = delta_of(compare_results(after_res, before_res, args.data))  # after SFT vs before, same sentences
        rows.append({
            "config": f"REAP {ratio:.1%} pruned (kept {plan.kept_counts[0]}/{plan.num_experts}) + SFT {res.mode}",
            "ratio": ratio, "chrf_before": round(before, 2), "chrf_after": round(after, 2),
            "chrf_unpruned": round(base_chrf, 2), "n": n,
            "before_vs_unpruned": delta_of(before_res["tasks"]["translation"]["baseline"]),
            "after_vs_unpruned": delta_of(after_res["tasks"]["translation"]["baseline"]),
            "after_vs_before": gain, "steps": res.steps, "best_step": res.best_step,
            "minutes": round(res.seconds / 60, 2), "val_loss_before": round(res.metrics_before["val_loss"], 4),
            "val_loss_after": round(res.metrics_after["val_loss"], 4), "lr": args.lr, "mix": args.mix,
            "limit_per_pair": args.limit,
        })
        print(f"  after SFT: chrF {after:.2f}; {res.steps} steps (best {res.best_step}) in {res.seconds / 60:.1f} min; "
              f"val loss {res.metrics_before['val_loss']:.3f} -> {res.metrics_after['val_loss']:.3f}")
        del pruned, res

    print()
    print("| config | n | chrF before SFT | chrF after SFT | unpruned chrF | after − unpruned [95% CI] | "
          "after − before [95% CI] | steps | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['n']} | {r['chrf_before']:.2f} | {r['chrf_after']:.2f} | {r['chrf_unpruned']:.2f} | "
              f"{difference_text(**r['after_vs_unpruned'])} | {difference_text(**r['after_vs_before'])} | "
              f"{r['steps']} (best {r['best_step']}) | {r['minutes']:.1f} |")
    print(f"\nchrF on the translation test split, first {args.limit} sentences per pair; SFT data {args.mix}, "
          f"lr {args.lr:g}, batch {args.batch_size} x {args.grad_accum}, mode {args.mode}, CPU threads {args.threads}.")
    if rows:
        # met only when the paired interval shows no loss: its lower end at or above 0
        ok = rows[0]["after_vs_unpruned"]["ci95"][0] >= 0
        print(f"target (chrF after SFT at {rows[0]['ratio']:.1%} >= unpruned, interval's lower end >= 0): "
              f"{'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
