"""CLI: ``probe`` and ``slim-dense`` (ProbScale layer selection for dense and MoE models)."""

from __future__ import annotations

import argparse
import sys

from ..errors import MoeSlimError
from .common import add_out, non_negative_int, positive_float, positive_int, seq_len


PROBE_MEASURED = (
    "Probe every layer on tasks and choose the layers to keep under a budget (ProbScale). Measured, in the paper's "
    "own setting (slim for one task, then fine-tune; bench/bench_probscale_tasks.py, docs/bench_probscale/tasks.md): "
    "ProbScale does NOT beat the baselines. On all-MiniLM-L6-v2, where the probes see no gain beyond noise (domain "
    "id, code vs prose, genre, catalog id) the plan is Block Influence's (differences exactly 0; retention at x6 "
    "0.993, 0.995, 0.875, 0.901, n = 300, 200, 300, 400). Where they change the plan (language id: the embeddings "
    "already separate languages), it keeps the first layers and the fine-tuned classifier falls to chance: retention "
    "at x6 0.261 vs Block Influence 0.851 (-0.59 [-0.67, -0.51], n = 400); SmolLM2-135M language id: 0.744 at x5, "
    "0.528 at x10 (n = 200). Its one win (SmolLM2 language id x5, +0.113 [+0.021, +0.205] over Block Influence) comes "
    "from removing one contiguous block, not from the probes (no layer's gain was beyond noise). Probes on the token "
    "the classifier reads (slim-dense --probe-pooling readout) do no better: they keep layer 0 alone at x6 (retention "
    "0.26-0.53). 95% retention at 5x: met on 2 of 6 MiniLM tasks and 1 of 4 SmolLM2 tasks, each time as (or tied "
    "with) Block Influence's plan. Use slim-dense --task to measure your own task, and compare --method "
    "block-influence.")


def _fractions(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None  # auto: the sweep runs only for a retain:X budget
    if text.strip().lower() in ("", "none", "0", "off"):
        return ()
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MoeSlimError(f"--scaling {text!r} must be a comma list of fractions, e.g. 0.2,0.4,0.6 (or 'off')") from None
    if not all(0 < v <= 1 for v in vals):
        raise MoeSlimError(f"--scaling {text!r}: every fraction must be in (0, 1]")
    return vals


def cmd_probe(args: argparse.Namespace) -> int:
    from ..dense.pipeline import run_probe

    res = run_probe(
        args.model, args.tasks, args.out, weights=args.weights, budget=args.budget, selection=args.selection,
        data_dir=args.data, split=args.split, per_class=args.per_class, seed=args.seed, pooling=args.pooling,
        max_length=args.max_length, batch_size=args.batch_size, n_folds=args.folds,
        scaling_fractions=_fractions(args.scaling), compare=not args.no_compare, eval_tasks=args.eval_tasks,
        eval_split=args.eval_split, overwrite=args.overwrite, model_eval=args.model_eval, mc_limit=args.mc_limit,
        heal_steps=args.heal,
    )
    sel = res["plan"]
    b = res["summary"]["budget"]
    kept = "; ".join(f"{s}: {len(k)} of {len(k) + len(sel.drop(_sizes(res))[s])}" for s, k in sel.keep.items())
    line = (f"wrote {args.out}: budget {b['spec']} (at most {b['params']:,} layer parameters) -> achieved: keep {kept} "
            f"layers, {sel.params:,} of {sel.total:,} layer parameters ({sel.total / sel.params:.2f}x fewer); every "
            "baseline at the same size")
    m = res["compare"].get(sel.method)
    if m and m.get("own"):
        o = m["own"]
        line += f"; {o['headline_metric']} {o['headline']:.3f} (n={o['n']})"
        if m.get("own_healed"):
            line += f", after {args.heal} heal steps {m['own_healed']['headline']:.3f}"
    if m:
        line += f"; probe retention {m['retention']:.3f}"
    print(line)
    return 0


def _sizes(res: dict) -> dict[str, int]:
    return {k: len(v) for k, v in res["summary"]["layer_params"].items()}


def _log(msg: str) -> None:
    print(f"moe-slim: {msg}", file=sys.stderr, flush=True)


def cmd_slim_dense(args: argparse.Namespace) -> int:
    if (args.plan is None) == (args.task is None):
        raise MoeSlimError("give --plan (a probe plan.json) or --task (a labelled JSONL to slim and fine-tune for)")
    if args.task is not None:
        return _slim_for_task(args)
    from ..dense.slim import apply_plan

    info = apply_plan(args.model, args.plan, args.out, overwrite=args.overwrite, heal_steps=args.heal,
                      heal_mode=args.heal_mode, heal_data=args.heal_data, data_dir=args.data, heal_lr=args.heal_lr,
                      seed=args.seed, log=_log, dtype=args.dtype)
    kept = "; ".join(f"{s}: {len(k)}" for s, k in info["keep"].items())
    h = info["heal"]
    healed = f"; healed: {h['mode']} {h['steps']} steps ({h['seconds']} s)" if h else ""
    note = f"; {info['dequantized']}" if info.get("dequantized") else ""
    print(f"wrote {args.out} (with README.md model card): kept layers {kept}; parameters {info['params_before']:,} "
          f"-> {info['params_after']:,}{healed}{note}")
    return 0


def _slim_for_task(args: argparse.Namespace) -> int:
    from ..dense.classify import FinetuneConfig
    from ..dense.taskrun import slim_for_task

    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, head_lr=10 * args.lr,
                         max_length=args.max_length,
                         train_layers=args.train_layers, seed=args.seed)
    info = slim_for_task(args.model, args.task, args.out, budget=args.budget or "x5", test_path=args.test,
                         method=args.method, finetune=cfg, dtype=args.dtype, overwrite=args.overwrite, log=_log,
                         probe_pooling=args.probe_pooling)
    r = info["retention"]
    note = f"; {info['dequantized']}" if info.get("dequantized") else ""
    print(f"wrote {args.out} (text-classification checkpoint with README.md card): kept layers {info['keep']}, "
          f"{info['reduction']:.2f}x fewer layer parameters; accuracy {r['accuracy']:.3f} vs {r['full_accuracy']:.3f} "
          f"full, retention {r['retention']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']}){note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="probe every layer on tasks and choose layers to keep under a budget (ProbScale)",
                       description=PROBE_MEASURED)
    p.add_argument("model", help="checkpoint directory or .gguf file")
    p.add_argument("--tasks", required=True,
                   help="comma list of built-ins (easy: langid, domainid, codeprose, genre, catalogid, pairmatch; hard: "
                        "pairmatch-hard, codeline, mathanswer, cloze) and/or JSONL files with text+label")
    p.add_argument("--weights", help="task weights, e.g. langid=2,pairmatch=1 (default: 1 each)")
    p.add_argument("--budget", help="layer-parameter budget: 0.33 | 33%% | x3 | 10L | 12M | retain:0.95 "
                                    "(default retain:0.95: the budget the scaling fit predicts)")
    p.add_argument("--selection", choices=("contiguous", "free"), default="contiguous",
                   help="plan.json removes one contiguous block of layers per stack (default) or any subset; "
                        "both variants and the baselines are written to plans/")
    add_out(p, "a probe directory (plan.json, probe matrix, plans/)")
    p.add_argument("--data", default="data", help="data directory for built-in tasks (default: data)")
    p.add_argument("--split", help="data split for built-in tasks (default: train, else the first found)")
    p.add_argument("--eval-split", help="measure retention on this split of the built-in tasks (held out), "
                                        "e.g. validation (default: on the probing texts)")
    p.add_argument("--eval-tasks", help="measure retention on these tasks (same names as --tasks), held out")
    p.add_argument("--per-class", type=positive_int, default=100, help="examples per label (default 100)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--pooling", choices=("mean", "last", "first"), default="mean",
                   help="what a probe reads of each layer: the mean over tokens (default), the last token, or the "
                        "first ([CLS])")
    p.add_argument("--max-length", type=seq_len, default=128, help="tokens per text (default 128)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--scaling", default=None,
                   help="budget fractions measured for the scaling fit, or 'off' (default: 0.1,0.2,0.3,0.4,0.5,0.65,0.8 "
                        "with a retain:X budget, which needs the fit; off with an explicit --budget)")
    p.add_argument("--no-compare", action="store_true", help="do not measure the baselines at the plan's budget")
    p.add_argument("--model-eval", choices=("auto", "on", "off"), default="auto",
                   help="score every compared plan on the model's own outputs (decoders: per-domain perplexity and "
                        "the MC tasks; encoders: classifiers on train->test splits), the headline retention; auto: "
                        "when --data has test splits (default)")
    p.add_argument("--mc-limit", type=positive_int, default=40, help="MC items per task for --model-eval (default 40)")
    p.add_argument("--heal", type=_steps, default=0, metavar="STEPS",
                   help="also heal every compared plan for STEPS distillation steps and score it again (default 0)")
    p.set_defaults(func=cmd_probe)

    s = sub.add_parser("slim-dense", help="remove the layers a probe plan drops and write the checkpoint; or, with "
                                          "--task, slim and fine-tune a classifier for a labelled JSONL task")
    s.add_argument("model", help="checkpoint directory or .gguf file (the one the plan was made for)")
    s.add_argument("--plan", help="plan.json written by probe")
    add_out(s, "a checkpoint")
    s.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="dtype written (default auto: the source's; bfloat16 for a GGUF source, de-quantized on load)")
    t = s.add_argument_group("task-specific slimming (--task instead of --plan)")
    t.add_argument("--task", help="JSONL with text and label per line: probe its layers, keep ProbScale's selection "
                                  "at --budget, fine-tune the slimmed and the full model the same way, write the "
                                  "slimmed classifier with its retention (n, 95%% interval) in the card")
    t.add_argument("--test", help="held-out JSONL scored for retention (default: a stratified 20%% of --task)")
    t.add_argument("--budget", help="fewer transformer-layer parameters, e.g. x5 (default), 0.2, 6L")
    t.add_argument("--method", default="probscale-contiguous",
                   help="whose plan to keep: probscale-contiguous (default), probscale-free, block-influence, "
                        "angular, first-n, last-n, evenly-spaced")
    t.add_argument("--probe-pooling", choices=("mean", "readout"), default="mean",
                   help="probes read the mean over tokens (default, ProbScale's), or the token the classifier reads "
                        "(readout: [CLS] for encoders, the last token for decoders)")
    t.add_argument("--steps", type=positive_int, default=150, help="fine-tuning steps, same for both models (default 150)")
    t.add_argument("--batch-size", type=positive_int, default=16)
    t.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate of the layers (the head: 10x)")
    t.add_argument("--max-length", type=seq_len, default=64, help="tokens per text (default 64)")
    t.add_argument("--train-layers", type=positive_int, default=None,
                   help="fine-tune only the top N kept layers and the head (default: all kept layers)")
    s.add_argument("--heal", type=_steps, default=0, metavar="STEPS",
                   help="after removing layers, heal for STEPS optimizer steps (default 0: no healing)")
    s.add_argument("--heal-mode", choices=("distill", "sft"), default="distill",
                   help="distill: KL to the original model's logits (encoders: its final hidden states); "
                        "sft: next-token fine-tuning (default distill)")
    s.add_argument("--heal-data", help="mix spec over the data's train split (default general=1)")
    s.add_argument("--heal-lr", type=positive_float, default=1e-4, help="learning rate (default 1e-4)")
    s.add_argument("--data", default=None, help="data directory for healing (default: data)")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.set_defaults(func=cmd_slim_dense)


def _steps(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of steps") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} steps: give 0 (no healing) or more")
    return non_negative_int(text)
