"""CLI: ``run`` (a thin wrapper over :func:`moe_slim.recipe.run.run_recipe`)."""

from __future__ import annotations

import argparse
import json

from .common import add_out


def cmd_run(args: argparse.Namespace) -> int:
    from ..recipe.run import run_recipe
    from ..recipe.spec import load_recipe

    recipe, raw = load_recipe(args.recipe)
    steps = run_recipe(recipe, raw, args.out, recipe_path=args.recipe, overwrite=args.overwrite,
                       progress=not args.quiet, log=None if args.quiet or args.json else print)
    if args.json:
        print(json.dumps({"out": args.out, **steps}, indent=2, sort_keys=True, default=str))
        return 0
    metrics = steps.get("metrics", {})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.count("/") == 1 and isinstance(v, float))
    print(f"wrote {args.out}: kept {steps.get('kept_per_layer')} experts per layer" + (f"; {shown}" if shown else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe: observe -> prune or merge -> optional SFT -> eval -> checkpoint")
    p.add_argument("recipe", help="recipe YAML (see moe_slim.recipe.spec for the schema)")
    add_out(p, "a checkpoint")
    p.add_argument("--json", action="store_true", help="print what each step produced as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)
