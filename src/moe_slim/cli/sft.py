"""CLI: ``sft`` (a thin wrapper over :func:`moe_slim.api.sft_checkpoint`)."""

from __future__ import annotations

import argparse

from ..recover.loop import SCHEDULERS
from ..recover.distill import DEFAULT_TOPK, LOSSES
from ..recover.modes import MODES
from .common import (
    add_json,
    add_out,
    emit,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seq_len,
)
from .core import add_device_options


def _warmup(text: str) -> int | float:
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad warm-up {text!r} (give steps like 20, or a fraction like 0.1)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("warm-up must not be negative")
    return value


def cmd_sft(args: argparse.Namespace) -> int:
    warmup = args.warmup
    from ..api import sft_checkpoint
    from ..errors import MoeSlimError

    if args.mix is None:
        raise MoeSlimError("sft needs --mix, e.g. --mix translation=0.8,general=0.2 (see moe-slim sft --help)")

    loss = args.loss or ("kd" if args.teacher or args.teacher_cache else "ce")
    result = sft_checkpoint(
        args.model, args.out, data=args.mix, steps=args.steps, mode=args.mode, merge_lora=args.merge_lora,
        loss=loss, teacher=args.teacher, teacher_cache=args.teacher_cache, teacher_topk=args.teacher_topk,
        layerwise_teacher=args.layerwise_teacher, kd_weight=args.kd_weight,
        overwrite=args.overwrite, device_map=args.device_map, data_dir=args.data_dir, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, warmup=warmup,
        scheduler=args.scheduler, weight_decay=args.weight_decay, eval_every=args.eval_every,
        val_examples=args.val_examples, patience=None if args.patience == 0 else args.patience, seed=args.seed,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_experts=args.lora_experts, dtype=args.dtype, device=args.device,
        compute_dtype=args.compute_dtype,
        chrf_limit=None if args.chrf_limit == 0 else args.chrf_limit, max_minutes=args.max_minutes,
        progress=not args.quiet,
        log=None if args.quiet else print,
    )
    b, a = result.metrics_before, result.metrics_after
    parts = [f"val_loss {b.get('val_loss', float('nan')):.4f} -> {a.get('val_loss', float('nan')):.4f}"]
    if "val_kd" in a:
        parts.append(f"val KL to teacher {b['val_kd']:.4f} -> {a['val_kd']:.4f}")
    if "chrf" in a:
        parts.append(f"chrF {b['chrf']:.2f} -> {a['chrf']:.2f}" + (
            f" ({a['chrf_delta']:+.2f} [{a['chrf_delta_lo']:+.2f}, {a['chrf_delta_hi']:+.2f}], paired bootstrap, "
            f"n = {int(a['chrf_n'])} sentences)" if "chrf_delta" in a else ""))
    what = "LoRA adapter" if result.mode == "lora" and not result.merged else "checkpoint"
    emit(args, {"out": args.out, "mode": result.mode, "loss": result.loss, "steps": result.steps, "best_step": result.best_step,
                "before": result.metrics_before, "after": result.metrics_after},
         f"wrote {what} {args.out}: {result.mode} {result.loss} SFT, {result.steps} steps (best {result.best_step}); "
         + "; ".join(parts))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="short supervised fine-tune that heals a pruned or merged model")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--mix", help="(required) mix over the built data's train split, e.g. translation=0.8,general=0.2 "
                                 "(or a YAML mix)")
    p.add_argument("--data", dest="mix", help=argparse.SUPPRESS)  # its name before --data-dir meant the data directory
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps (at most; early stopping may end sooner)")
    add_out(p, "a checkpoint (or a LoRA adapter)")
    p.add_argument("--mode", default="experts", choices=MODES,
                   help="full | experts (experts and routers only; default) | router (router weights only) "
                        "| lora (attention/MLP linears)")
    p.add_argument("--teacher", help="the unpruned checkpoint to distil from (implies --loss kd)")
    p.add_argument("--loss", choices=LOSSES, help="ce (references' target tokens; the default without --teacher) | "
                   "kd (KL to the teacher on every position) | kd+ce (--kd-weight blend)")
    p.add_argument("--kd-weight", type=probability, default=0.5, help="kd+ce: weight of the KL term (default 0.5)")
    p.add_argument("--teacher-cache", help="safetensors file of the teacher's top-k distributions: built there "
                   "(before the student is loaded) or reused when it matches the run")
    p.add_argument("--teacher-topk", type=positive_int, default=DEFAULT_TOPK,
                   help=f"tokens per position kept in the teacher cache (default {DEFAULT_TOPK})")
    p.add_argument("--layerwise-teacher", action="store_true",
                   help="build the teacher cache one teacher layer in memory at a time (for teachers that do not "
                        "fit beside the student)")
    p.add_argument("--merge-lora", action="store_true", help="lora: write merged weights instead of an adapter")
    p.add_argument("--data-dir", dest="data_dir", default=None,
                   help="built data directory (default: $MOE_SLIM_DATA, else ./data, else the checkout's data/)")
    p.add_argument("--lr", type=positive_float,
                   help="peak learning rate (default: full 5e-5, experts 1e-4, router 1e-3, lora 2e-4)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=seq_len, default=256)
    p.add_argument("--warmup", type=_warmup, default=0.1, help="warm-up steps, or a fraction of --steps (default 0.1)")
    p.add_argument("--scheduler", default="cosine", choices=SCHEDULERS)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--eval-every", type=positive_int, help="validation interval in steps (default: steps/10)")
    p.add_argument("--val-examples", type=positive_int, default=64, help="validation examples (default 64)")
    p.add_argument("--patience", type=non_negative_int, default=3, help="evaluations without improvement before stopping (0: never)")
    p.add_argument("--chrf-limit", type=non_negative_int, default=25,
                   help="sentences per pair for chrF before/after when translation is in the mix (0: skip)")
    p.add_argument("--max-minutes", type=positive_float, help="stop training after this many minutes (wall clock)")
    p.add_argument("--lora-r", type=positive_int, default=16)
    p.add_argument("--lora-alpha", type=positive_int, default=32)
    p.add_argument("--lora-dropout", type=probability, default=0.0)
    p.add_argument("--lora-experts", action="store_true",
                   help="lora: also adapt fused 3-D expert weights (one low-rank update per expert)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device-map", help="passed to accelerate when loading (e.g. auto)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the written weights: auto (the source's; training runs in float32 on CPUs), "
                        "bfloat16, float16, float32")
    add_device_options(p, "--compute-dtype")
    p.add_argument("--quiet", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_sft)
