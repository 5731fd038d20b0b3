"""CLI: ``push`` (a thin wrapper over :func:`moe_slim.checkpoint.push.push_to_hub`)."""

from __future__ import annotations

import argparse

from .common import add_json, emit


def cmd_push(args: argparse.Namespace) -> int:
    from ..checkpoint.push import push_to_hub

    url = push_to_hub(args.checkpoint, args.repo, results=args.results, private=args.private)
    emit(args, {"checkpoint": args.checkpoint, "repo": args.repo, "commit": url},
         f"pushed {args.checkpoint} to {args.repo}: {url}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a checkpoint moe_slim wrote to the Hugging Face Hub (needs the network)")
    p.add_argument("checkpoint", help="checkpoint directory written by prune, apply, merge, sft or run")
    p.add_argument("repo", help="Hub repository id, OWNER/NAME (created if missing; log in with `hf auth login`)")
    p.add_argument("--results", help="results JSON of moe-slim eval: its scores go into the uploaded card")
    p.add_argument("--private", action="store_true", help="create the repository private")
    add_json(p)
    p.set_defaults(func=cmd_push)
