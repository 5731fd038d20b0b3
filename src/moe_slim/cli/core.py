"""CLI: ``observe``, ``prune``, ``apply``, ``stats``, ``families`` (thin wrappers over :mod:`moe_slim.api`)."""

from __future__ import annotations

import argparse
import json
import os

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

# Heavy modules (transformers) are imported inside the commands, so `moe-slim --help` and
# one-line errors come fast.
CRITERIA_HELP = "frequency, gate, weighted_frequency, ean, reap, reap_weights, reap_mass, mone, task_contrast, random"


def cmd_observe(args: argparse.Namespace) -> int:
    from .. import api
    from ..checkpoint.shard_writer import parse_size

    stats = api.observe_checkpoint(
        args.model, args.calib, args.out, seq_len=args.seq_len, batch_size=args.batch_size,
        max_tokens=_tokens(args.max_tokens) if args.max_tokens else None, pack=not args.no_pack,
        device_map=args.device_map, data_dir=args.data_dir, overwrite=args.overwrite, progress=not args.quiet,
        samples=_tokens(args.samples) if args.samples else 0, layerwise=args.layerwise, device=args.device,
        dtype=args.dtype, work_dir=args.work_dir,
        **({"cache_bytes": parse_size(args.cache_max)} if args.cache_max else {}),
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 wrote, and only it reports
        return 0
    how = f", layer-wise on {stats.meta['layerwise']['device']}" if "layerwise" in stats.meta else ""
    tokens = {d: int(v) for d, v in stats.meta["tokens_per_domain"].items()}
    emit(args, {"out": args.out, "moe_layers": stats.n_layers, "experts": stats.n_experts, "tokens_per_domain": tokens,
                "layerwise": stats.meta.get("layerwise"), "seconds": stats.meta.get("seconds")},
         f"wrote {args.out}: {stats.n_layers} MoE layers x {stats.n_experts} experts; tokens per domain {tokens}{how}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .. import api

    plan = api.prune_checkpoint(
        args.model, args.stats, args.out, criterion=args.criterion, ratio=args.ratio, mix=api.parse_weights(args.mix),
        reference=api.parse_weights(args.reference), budget=args.budget, floor=args.floor, seed=args.seed,
        overwrite=args.overwrite, plan_only=args.plan_only, protect_super=args.protect_super, **_write_options(args),
    )
    if args.plan_only:
        i = plan.info
        emit(args, {"plan": f"{args.out}/plan.json", "kept_per_layer": plan.kept_counts, "num_experts": plan.num_experts,
                    "params_before": i.get("params_before"), "params_after": i.get("params_after")},
             f"wrote {args.out}/plan.json: keeps {plan.kept_counts} experts per layer of {plan.num_experts}, "
             f"parameters {i.get('params_before', 0):,} -> {i.get('params_after', 0):,} "
             f"(evaluate it with: moe-slim eval {args.model} --plan {args.out}/plan.json --out results.json)")
        return 0
    _print_plan(args, plan, args.out)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from .. import api

    plan = api.apply_checkpoint(args.model, args.plan, args.out, overwrite=args.overwrite, **_write_options(args))
    _print_plan(args, plan, args.out)
    return 0


def _write_options(args: argparse.Namespace) -> dict:
    return {"in_memory": args.in_memory, "dtype": args.dtype, "max_shard_size": args.max_shard_size,
            "progress": not args.quiet, "drop_mtp": args.drop_mtp}


def add_write_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that write a pruned checkpoint."""
    p.add_argument("--in-memory", action="store_true",
                   help="load the model, slice it and save it (default for safetensors checkpoints: stream the "
                        "shards tensor by tensor without building the model)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the written weights: auto (each tensor keeps the source's), bfloat16, float16, float32")
    p.add_argument("--max-shard-size", help="largest output shard, e.g. 2GB (default 5GB, as transformers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_drop_mtp(p)


def add_drop_mtp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop-mtp", action="store_true",
                   help="leave the checkpoint's MTP (next-n) layers out of the output and set its MTP layer count to 0 "
                        "(default: they are pruned or merged with the plan like every MoE layer)")


def add_device_options(p: argparse.ArgumentParser, dtype_flag: str = "--dtype") -> None:
    """``--device`` and the compute dtype of a command that runs a model."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU when there is one)")
    p.add_argument(dtype_flag, default="auto",
                   help="compute dtype: auto (the checkpoint's on a GPU, float32 on a CPU), bfloat16, float16, float32")


def _print_plan(args: argparse.Namespace, plan, out) -> None:
    i = plan.info
    emit(args, {"out": str(out), "kind": plan.kind, "kept_per_layer": plan.kept_counts, "num_experts": plan.num_experts,
                "params_before": i.get("params_before"), "params_after": i.get("params_after")},
         f"wrote {out}: kept {plan.kept_counts} experts per layer of {plan.num_experts}; parameters "
         f"{i.get('params_before', 0):,} -> {i.get('params_after', 0):,}")


def cmd_stats(args: argparse.Namespace) -> int:
    from ..experts.stats import RouterStats

    stats = RouterStats.load(args.stats)
    m = stats.meta
    print(json.dumps({k: m[k] for k in ("family", "num_experts", "top_k", "tokens_per_domain", "model_path", "seq_len", "samples")
                      if k in m}, indent=2))
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    from ..families.catalog import family_rows

    rows = family_rows()
    emit(args, {"families": [{"model_type": mt, "status": st, "differs": notes} for mt, st, notes in rows]},
         "\n".join(f"{mt:36s} {st:32s} {notes}" for mt, st, notes in rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("observe", help="record router statistics per calibration domain")
    p.add_argument("model")
    p.add_argument("--calib", required=True,
                   help="general=a.jsonl,translation=b.jsonl | a directory | a mix over --data-dir (translation=3,general=1@200k)")
    add_out(p, "a router statistics directory")
    add_data_dir(p)
    p.add_argument("--seq-len", type=seq_len, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-tokens", help="token budget per domain, e.g. 50k")
    p.add_argument("--no-pack", action="store_true", help="one text per row with padding instead of packing")
    p.add_argument("--samples", nargs="?", const="32k", metavar="N",
                   help="also keep a token sample of N tokens per domain and MoE layer (layer inputs, router logits, "
                        "routing) for expert merging; --samples alone means 32k")
    p.add_argument("--device-map", help="accelerate device map, e.g. auto (CPU/disk offload)")
    add_device_options(p)
    lw = p.add_mutually_exclusive_group()
    lw.add_argument("--layerwise", action="store_true", default=None,
                    help="one transformer layer in memory at a time, read from the safetensors shards (default when "
                         "the model would not fit in the device's free memory)")
    lw.add_argument("--no-layerwise", dest="layerwise", action="store_false", help="always load the whole model")
    p.add_argument("--work-dir", help="layer-wise: where progress is kept so an interrupted run resumes "
                                      "(default: .OUT.layerwise beside --out; removed when done)")
    p.add_argument("--cache-max", help="layer-wise: layer outputs kept in memory before spilling to --work-dir "
                                       "(default 2GiB)")
    p.add_argument("--quiet", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_observe)

    p = sub.add_parser("prune", help="remove the lowest-scoring experts and write a checkpoint")
    p.add_argument("model")
    p.add_argument("--stats", required=True)
    p.add_argument("--criterion", default="reap", help=f"one of: {CRITERIA_HELP}")
    p.add_argument("--protect-super", action="store_true",
                   help="never remove a super-expert (largest output norm a robust-z > 3.5 outlier over the model)")
    p.add_argument("--ratio", type=fraction,
                   help="share of experts to remove, in (0, 1); needed by the uniform and global budgets")
    p.add_argument("--mix", help="calibration mix to score on, e.g. translation=3,general=1 (default: all domains)")
    p.add_argument("--reference", help="reference mix for task_contrast (default: the domains the mix leaves out)")
    p.add_argument("--budget", default="uniform",
                   help="uniform | global (one ranking across layers) | FILE: per-layer counts, a JSON/YAML list with "
                        "one integer per MoE layer or a map {layer name: count}")
    p.add_argument("--plan-only", action="store_true",
                   help="write only OUT/plan.json (any budget), no checkpoint; evaluate it with eval --plan")
    p.add_argument("--floor", type=positive_int, help="per-layer minimum for --budget global (never below top-k)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_out(p, "a checkpoint (a plan directory with --plan-only)")
    add_write_options(p)
    add_json(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("apply", help="apply a saved plan.json to a checkpoint (no statistics needed)")
    p.add_argument("model")
    p.add_argument("--plan", required=True)
    add_out(p, "a checkpoint")
    add_write_options(p)
    add_json(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("stats", help="summarise a stats directory")
    p.add_argument("stats")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("families", help="list the supported MoE families")
    add_json(p)
    p.set_defaults(func=cmd_families)
