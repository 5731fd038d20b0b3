"""CLI: ``mone`` (a thin wrapper over :func:`moe_slim.api.mone.mone_checkpoint`)."""

from __future__ import annotations

import argparse

from .common import add_json, add_out, emit, fraction
from .core import add_drop_mtp


def cmd_mone(args: argparse.Namespace) -> int:
    from ..api import parse_weights
    from ..api.mone import mone_checkpoint

    nplan = mone_checkpoint(args.model, args.stats, args.out, ratio=args.ratio, mix=parse_weights(args.mix),
                            standard=args.standard, overwrite=args.overwrite, dtype=args.dtype,
                            drop_mtp=args.drop_mtp)
    plan = nplan.plan
    what = "standard checkpoint (novices dropped)" if args.standard else \
        "vLLM expert-substitution checkpoint (plain transformers cannot load it)"
    emit(args, {"out": args.out, "num_experts": plan.num_experts, "kept_per_layer": plan.kept_counts,
                "standard": args.standard},
         f"wrote {args.out}: {what}; keeps {plan.kept_counts[0]} of {plan.num_experts} experts per layer")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mone", help="MoNE: replace the least needed experts by their mean output (novices)")
    p.add_argument("model")
    p.add_argument("--stats", required=True, help="stats directory from observe (with output sums)")
    p.add_argument("--ratio", type=fraction, required=True, help="share of experts turned into novices, in (0, 1)")
    p.add_argument("--mix", help="calibration mix, e.g. translation=3,general=1 (default: all domains)")
    p.add_argument("--standard", action="store_true",
                   help="write the nearest standard checkpoint instead (novices dropped, router sliced; loads anywhere)")
    add_out(p, "a checkpoint")
    p.add_argument("--dtype", default="auto", help="dtype of the written weights (default: the source's)")
    add_drop_mtp(p)
    add_json(p)
    p.set_defaults(func=cmd_mone)
