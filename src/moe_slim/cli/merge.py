"""CLI: ``merge`` (a thin wrapper over :func:`moe_slim.api.merge_checkpoint`)."""

from __future__ import annotations

import argparse

from .common import (
    _tokens,
    add_data_dir,
    add_json,
    add_out,
    emit,
    fraction,
    non_negative_int,
    positive_int,
    seq_len,
)
from .core import add_device_options, add_drop_mtp

# Mirrors of moe_slim.experts.merge.methods / .config (a test keeps them equal), so the parser needs no torch.
METHODS: tuple[str, ...] = ("ream", "hc-smoe", "m-smoe", "average")
PRESETS: tuple[str, ...] = ("ream-repo", "ream-paper", "hc-smoe-paper", "m-smoe-paper")
GROUPINGS: tuple[str, ...] = ("ream", "hc", "msmoe")
WEIGHTINGS: tuple[str, ...] = ("saliency", "p2norm-routed", "p2norm-all", "frequency", "uniform")
CENTROIDS: tuple[str, ...] = ("reap", "p2norm-routed", "p2norm-all")
PCAS: tuple[str, ...] = ("layer", "pair", "off")
DEFAULT_ALIGN_TOKENS = 8192
#: the MergeOptions fields the parser fills (None: not given, the method's or preset's value)
CHOICES = ("grouping", "router_row", "tied", "align", "weighting", "centroids", "pca", "pca_dims", "dominants",
           "global_dominants", "protect_super", "group_size", "sequential", "seed")


def cmd_merge(args: argparse.Namespace) -> int:
    from ..api import merge_checkpoint, parse_weights

    plan = merge_checkpoint(
        args.model, args.out, method=args.method, ratio=args.ratio, stats_path=args.stats, calib=args.calib,
        plan_path=args.plan, mix=parse_weights(args.mix),
        max_tokens=_tokens(args.max_tokens) if args.max_tokens else None,
        align_tokens=_tokens(args.align_tokens) if args.align_tokens else None,
        samples=_tokens(args.samples) if args.samples else None, seq_len=args.seq_len, batch_size=args.batch_size,
        data_dir=args.data_dir, overwrite=args.overwrite, dtype=args.dtype, device=args.device,
        plan_only=args.plan_only, compute_dtype=args.compute_dtype, log=None if args.quiet else print,
        in_memory=args.in_memory, max_shard_size=args.max_shard_size, progress=not args.quiet, drop_mtp=args.drop_mtp,
        **{k: getattr(args, k) for k in CHOICES if getattr(args, k) is not None},
    )
    i = plan.info
    emit(args, {"out": args.out, "method": i.get("method"), "num_experts": plan.num_experts,
                "kept": len(plan.layers[0].groups), "params_before": i.get("params_before"),
                "params_after": i.get("params_after"), "plan_only": args.plan_only},
         f"wrote {args.out}: merged {plan.num_experts} -> {len(plan.layers[0].groups)} experts per layer "
         f"({i.get('method')}{', tied: every member keeps the merged weights, nothing shrinks' if i.get('tied') else ''}); "
         f"parameters {i.get('params_before', 0):,} -> {i.get('params_after', 0):,}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge experts (REAM, HC-SMoE, M-SMoE, average) into a smaller checkpoint")
    p.add_argument("model")
    p.add_argument("--method", default="ream",
                   help=f"a method: {', '.join(METHODS)} (default: ream); or a reference's defaults: {', '.join(PRESETS)}")
    p.add_argument("--ratio", type=fraction, help="share of experts removed per layer, in (0, 1)")
    p.add_argument("--stats", help="stats directory observed with --samples")
    p.add_argument("--calib", help="calibration text, observed here (same SPEC forms as observe)")
    p.add_argument("--plan", help="replay a saved merge plan.json (its permutations file beside it); no stats needed")
    add_data_dir(p)
    p.add_argument("--mix", help="calibration mix, e.g. translation=3,general=1 (default: all domains)")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help="REAM's C: most experts in one group (default: see README 'Merging'; ream-repo: 16)")
    p.add_argument("--max-tokens", help="sample tokens per layer used for merging (default 32k)")
    p.add_argument("--align-tokens",
                   help=f"tokens whose activations align neurons (default {DEFAULT_ALIGN_TOKENS})")
    p.add_argument("--samples", help="with --calib: sample tokens kept per domain (default: --max-tokens)")
    p.add_argument("--grouping", help=f"override the method's grouping: {', '.join(GROUPINGS)}")
    p.add_argument("--sequential", action="store_true", default=None,
                   help="merge layer by layer, re-gathering each layer's inputs through the merged layers (needs --calib)")
    p.add_argument("--router-row", choices=("frequency", "saliency", "method"),
                   help="whose router row a merged expert keeps: its group's most frequently routed member, most "
                        "REAP-salient, or the method's own representative (default: saliency for ream/average, "
                        "frequency for hc-smoe/m-smoe)")
    p.add_argument("--tied", action="store_true", default=None,
                   help="the papers' merge: every member bound to the merged weights, router untouched, no shrink "
                        "(to compare with published numbers)")
    p.add_argument("--align", choices=("ream", "weights", "none"), help="override the method's neuron alignment")
    p.add_argument("--weighting", choices=WEIGHTINGS,
                   help="override the merge weights: saliency (REAP), p2norm-routed (REAM's repository: p^2*||f|| over "
                        "the tokens routed to the expert), p2norm-all (over every sample token), frequency, uniform")
    p.add_argument("--centroids", choices=CENTROIDS,
                   help="REAM: the saliency that picks centroids (reap: REAP from the statistics; p2norm-routed: "
                        "REAM's repository)")
    p.add_argument("--pca", choices=PCAS,
                   help="REAM alignment's weight PCA: layer (REAM's repository: one per layer, rows normalised, "
                        "projected onto V*diag(s)), pair (one per pair of experts, raw rows), off")
    p.add_argument("--pca-dims", type=non_negative_int, help="REAM alignment: PCA dims of weight features (default 64)")
    p.add_argument("--dominants", choices=("frequency", "saliency"), help="M-SMoE dominants (default frequency)")
    p.add_argument("--global-dominants", action="store_true", default=None,
                   help="M-SMoE: rank dominants across layers (needs --tied)")
    p.add_argument("--protect-super", action="store_true", default=None,
                   help="never merge a super-expert (largest output norm a robust-z > 3.5 outlier) into another")
    p.add_argument("--seq-len", type=seq_len, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=non_negative_int, default=None)
    add_out(p, "a checkpoint (a plan directory with --plan-only)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the written weights: auto (the source's; merging computes in float32), bfloat16, "
                        "float16, float32")
    p.add_argument("--plan-only", action="store_true",
                   help="write only OUT/plan.json and the permutations, no checkpoint (replay: apply or eval --plan)")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model (default for safetensors checkpoints: one MoE layer in memory at a "
                        "time, read from the shards; the output streamed shard by shard)")
    p.add_argument("--max-shard-size", help="largest output shard, e.g. 2GB (default 5GB, as transformers)")
    add_drop_mtp(p)
    add_device_options(p, "--compute-dtype")
    p.add_argument("--quiet", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_merge)
