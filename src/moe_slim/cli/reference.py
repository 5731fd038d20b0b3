"""CLI: ``train-reference`` and ``reference-card`` (the shipped reference MoE)."""

from __future__ import annotations

import argparse
import dataclasses

from ..reference import REFERENCE_DIR
from .common import add_data_dir, add_out, non_negative_int, positive_float, positive_int


def cmd_train(args: argparse.Namespace) -> int:
    from ..reference.recipe import Recipe
    from ..reference.train import train_reference

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe()
    if args.steps:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    if args.dense_steps is not None:
        recipe = dataclasses.replace(recipe, dense_steps=args.dense_steps)
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    info = train_reference(args.out, data_dir=args.data_dir, recipe=recipe, overwrite=args.overwrite, device=args.device,
                           max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    print(f"wrote {args.out}: {info['tokens_seen']:,} tokens in {info['train_seconds'] / 60:.1f} min on {info['device']}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from ..reference.card import write_card

    n = args.translation_per_pair or None
    limits = {s: {"per_pair": n, "mc_limit": n, "ppl_docs": n} for s in ("catalog_test", "test")}
    m = write_card(args.model, data_dir=args.data_dir, limits=limits)
    for split, e in m["splits"].items():
        vs = ", ".join(f"{p} {t['chrf']:.1f} (copy {t['copy_chrf']:.1f}, n {t['n']})"
                       for p, t in sorted(e["translation_vs_copy"].items()))
        print(f"{split}: chrF {vs}")
    print(f"wrote {args.model}/README.md and metrics.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-reference", help="train the reference MoE from the built data (GPU if present)")
    add_out(p, "the reference model", default=str(REFERENCE_DIR))
    add_data_dir(p)
    p.add_argument("--steps", type=positive_int, help="override the recipe's step count")
    p.add_argument("--dense-steps", type=non_negative_int,
                   help="override the recipe's dense (pre-upcycling) step count; 0 trains the MoE from scratch")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-minutes", type=positive_float,
                   help="stop the MoE training once this many minutes have passed (recorded in training.json)")
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("reference-card", help="measure the reference model and write its model card")
    p.add_argument("model", nargs="?", default=str(REFERENCE_DIR))
    add_data_dir(p)
    p.add_argument("--translation-per-pair", type=non_negative_int, default=0,
                   help="sentences per pair (and MC items per task, documents per domain) on each split "
                        "(default 0: the whole catalog_test and test splits)")
    p.set_defaults(func=cmd_card)
