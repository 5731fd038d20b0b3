"""``moe-slim eval``: score a checkpoint with a named suite and write the results JSON."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..evals.suites import BUILTIN_TASKS, SUITES, TASK_ALIASES
from .common import add_data_dir, add_json, emit, positive_int, seq_len


def register(subparsers: Any) -> None:
    suites = "; ".join(f"{s.name}: {s.description}" for s in SUITES.values())
    p = subparsers.add_parser(
        "eval", help="score a checkpoint: translation, multiple choice, math, perplexity",
        description=f"Evaluate a checkpoint and write results JSON. Suites: {suites}.",
    )
    p.add_argument("checkpoint", help="model checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("--suite", default="quick", help=f"named preset: {', '.join(SUITES)} (default: quick)")
    p.add_argument("--out", required=True, help="results JSON to write (refused if it exists, see --overwrite)")
    add_data_dir(p)
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated tasks instead of the suite's: {', '.join(BUILTIN_TASKS)}, aliases "
                        f"{', '.join(TASK_ALIASES)}, or lm-eval task names found with --include-path")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="at most N items per task (per language pair for translation, per domain for perplexity)")
    p.add_argument("--plan", help="apply this plan.json (prune or merge, written by prune/merge --plan-only or beside "
                                   "a checkpoint) to the model in memory first: any counts per layer")
    p.add_argument("--translation-testset", metavar="NAME:SRC-TGT",
                   help="translate a standard test set instead of the built data's split: wmt22:en-de (sacrebleu's "
                        "WMT sets) or flores200:en-de (FLORES+ on the hub); downloaded once, needs the network")
    p.add_argument("--baseline", default=None,
                   help="results JSON of another system: paired-bootstrap intervals of the translation scores")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="directory of extra lm-eval task YAMLs (repeatable). This RUNS PYTHON CODE from DIR: "
                        "lm-eval's !function tag imports the .py files it names there; give only directories you trust")
    p.add_argument("--batch-size", type=positive_int, default=None, help="generation batch size (default 32)")
    p.add_argument("--mc-batch-size", type=positive_int, default=None, help="lm-eval batch size (default 16)")
    p.add_argument("--seq-len", type=seq_len, default=None, help="perplexity window length in tokens")
    p.add_argument("--mc-cache", default=None, help="where derived MC items are cached (default: ~/.cache/moe_slim/mc, or $MOE_SLIM_CACHE/mc)")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (the checkpoint's on a GPU, float32 on a CPU), bfloat16, float16, float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU when there is one)")
    p.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, only when it is a results file moe_slim wrote")
    p.add_argument("--split", default="test",
                   help="data split to evaluate: test (default), validation, ..., or catalog_test / catalog_validation "
                        "(translation from whole catalogs unseen in training; other domains then use test)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import MoeSlimError
    from ..evals.run import plan_evaluation, run_plan, write_results
    from ..modeling.hub import resolve_model
    from ..modeling.loading import load_model
    from ..outputs import check_output

    plan = plan_evaluation(args.suite, tasks=args.tasks, data_dir=args.data_dir, limit=args.limit,
                           translation_testset=args.translation_testset,
                           include_path=args.include_path, baseline=args.baseline, split=args.split)
    args.checkpoint = str(resolve_model(args.checkpoint))  # a local directory, or a Hugging Face Hub id
    check_output(args.out, args.overwrite, inputs=[args.checkpoint, args.data_dir, args.baseline, args.plan,
                                                   *(args.include_path or [])], kind="results")
    if args.plan is not None:
        from ..api import load_plan

        load_plan(args.plan)  # a missing or malformed plan is one line, before the model loads
    for name, value in (("--batch-size", args.batch_size), ("--mc-batch-size", args.mc_batch_size),
                        ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise MoeSlimError(f"{name} must be a positive number, not {value}")

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"moe-slim eval: {msg}", file=sys.stderr, flush=True)

    if args.quiet:  # lm-eval's and datasets' progress bars too
        os.environ["TQDM_DISABLE"] = "1"
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass
    from ..modeling.loading import load_config

    load_config(args.checkpoint)  # a missing or broken checkpoint is one line, before any progress output
    log(f"loading {args.checkpoint}")
    from ..modeling.devices import compute_dtype, resolve_device

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.checkpoint, dtype=compute_dtype(args.dtype, device, args.checkpoint),
                                  device_map=args.device_map, device=None if args.device_map else device)
    if tokenizer is None:
        raise MoeSlimError(f"{args.checkpoint} has no tokenizer; evaluation needs one (save it with the checkpoint)")
    plan_info = None
    if args.plan is not None:
        from ..api import apply_plan_file

        applied = apply_plan_file(model, args.plan)
        plan_info = {"path": str(args.plan), "kind": applied.kind, "kept_per_layer": applied.kept_counts,
                     "info": applied.info}
        log(f"applied {applied.kind} plan {args.plan}: {applied.kept_counts} experts per layer")
    results = run_plan(model, tokenizer, plan, baseline=args.baseline, batch_size=args.batch_size,
                       mc_batch_size=args.mc_batch_size, seq_len=args.seq_len, mc_cache_dir=args.mc_cache,
                       log=log, limit=args.limit)
    results["model"]["checkpoint"] = str(Path(args.checkpoint))
    if plan_info is not None:
        results["plan"] = plan_info
    write_results(results, args.out, overwrite=args.overwrite)
    lines = summary_lines(results["metrics"])
    emit(args, {"out": args.out, "metrics": results["metrics"], "seconds": results["timings_s"]["total"]},
         "\n".join(lines + [f"wrote {args.out} ({results['timings_s']['total']:.1f} s)"]))
    return 0


#: keys folded into the chrF line of the summary
_CHRF_PARTS = ("translation/n", "translation/copy_chrf", "translation/chrf_lo", "translation/chrf_hi",
               "translation/chrf_delta_vs_copy", "translation/chrf_delta_vs_copy_lo", "translation/chrf_delta_vs_copy_hi")


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per headline metric; chrF with its n, its 95% interval and the copy-the-source baseline
    (a pruned model can score below copying its input, which chrF alone hides)."""
    lines = []
    for k, v in metrics.items():
        if k.count("/") != 1 or k in _CHRF_PARTS:
            continue
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        if k == "translation/chrf" and "translation/chrf_lo" in metrics:
            text = f"{v:.2f} [{metrics['translation/chrf_lo']:.2f}, {metrics['translation/chrf_hi']:.2f}]"
        if k == "translation/chrf" and "translation/n" in metrics:
            text += f" (n = {int(metrics['translation/n'])}"
            if "translation/chrf_delta_vs_copy" in metrics:
                lo, hi = metrics["translation/chrf_delta_vs_copy_lo"], metrics["translation/chrf_delta_vs_copy_hi"]
                text += (f"; copy the source {metrics['translation/copy_chrf']:.2f}, difference "
                         f"{metrics['translation/chrf_delta_vs_copy']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                         + (", a tie" if lo <= 0 <= hi else ""))
            text += ")"
        lines.append(f"{k}\t{text}")
    return lines
