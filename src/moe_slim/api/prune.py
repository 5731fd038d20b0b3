"""``moe-slim prune`` and ``moe-slim apply``: checkpoint in, smaller checkpoint out (streamed by default)."""


from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..checkpoint.cards import merge_card, prune_card
from ..checkpoint.rewrite import check_quantization, rewrite_pruned
from ..checkpoint.save import save_checkpoint
from ..checkpoint.shard_writer import DEFAULT_MAX_SHARD_BYTES, parse_size
from ..errors import MoeSlimError
from ..experts.criteria import ALL_CRITERIA
from ..experts.merge.plan import MergePlan
from ..experts.mtp_plan import cover_mtp
from ..experts.plan import ExpertPlan, check_ratio
from ..experts.prune import apply_plan, count_parameters
from ..experts.stats import RouterStats
from ..families import check_uniform, family_of, moe_layers
from ..modeling.hub import resolve_model
from ..modeling.loading import (
    load_config,
    load_model,
    parse_dtype,
)
from ..modeling.mtp import check_mtp_writable, checkpoint_skeleton, drop_mtp as drop_mtp_layers
from ..modeling.shards import has_safetensors, load_dtype
from ..outputs import check_output
from .plans import load_plan, plan_for, plan_parameters, write_plan


def prune_checkpoint(
    model_path: str | os.PathLike,
    stats_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    criterion: str = "reap",
    ratio: float | None = None,
    mix: dict[str, float] | None = None,
    reference: dict[str, float] | None = None,
    budget: str = "uniform",
    floor: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    in_memory: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    progress: bool = True,
    plan_only: bool = False,
    protect_super: bool = False,
    drop_mtp: bool = False,
) -> ExpertPlan:
    """Prune a checkpoint with saved statistics and write the result (plan.json and card beside it).

    ``plan_only`` writes just ``OUT/plan.json``, for any budget (different counts per layer too):
    evaluate it in memory with ``moe-slim eval MODEL --plan OUT/plan.json``. ``ratio`` is the share
    of experts removed (uniform and global budgets); a counts file needs none.

    A safetensors checkpoint is rewritten by streaming its shards (:mod:`moe_slim.checkpoint.rewrite`:
    the model is never built, every tensor keeps its dtype); ``in_memory=True`` loads the model,
    slices it and saves it instead. ``dtype`` converts the weights (default: keep the source's). MTP layers
    stored in the checkpoint are pruned with the plan (:mod:`moe_slim.modeling.mtp`); ``drop_mtp`` leaves them
    out and sets the config's MTP layer count to 0.
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    check_output(out, overwrite, inputs=[model_path, stats_path], kind="plan" if plan_only else "checkpoint")
    if criterion not in ALL_CRITERIA:
        raise MoeSlimError(f"unknown criterion '{criterion}' (choose from: {', '.join(ALL_CRITERIA)})")
    if ratio is not None:
        check_ratio(ratio)
    config = load_config(model_path)
    family_of(config)
    want = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD_BYTES
    stats = RouterStats.load(stats_path)
    streaming = plan_only or not in_memory and has_safetensors(model_path)
    if streaming:
        check_quantization(config, str(model_path))
        model, tok = checkpoint_skeleton(config, model_path), None
    else:
        model, tok = load_model(model_path, dtype=load_dtype(want, model_path))
    plan = plan_for(model, stats, criterion=criterion, ratio=ratio, mix=mix, reference=reference, budget=budget,
                    floor=floor, seed=seed, protect_super=protect_super)
    plan.info["stats_path"] = str(stats_path)
    if plan_only:
        plan.info["params_before"], plan.info["params_after"] = plan_parameters(config, plan)
        write_plan(plan, out, overwrite=overwrite)
    elif streaming:
        _stream(model_path, out, plan, stats.meta, want, shard_bytes, overwrite, progress, drop_mtp)
    else:
        _write(model, tok, plan, model_path, out, overwrite, stats.meta, want, shard_bytes, drop_mtp)
    return plan


def apply_checkpoint(
    model_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    in_memory: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    progress: bool = True,
    drop_mtp: bool = False,
) -> ExpertPlan:
    """Apply a saved plan to a checkpoint (no statistics needed); streamed like :func:`prune_checkpoint`.

    A merge plan (kind ``merge``, with the neuron permutations saved beside it) is replayed the same
    way, one MoE layer in memory at a time (:class:`~moe_slim.experts.merge.at_size.MergedLayers`);
    ``in_memory=True`` (or a source without safetensors) replays it on the loaded model.
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    check_output(out, overwrite, inputs=[model_path, plan_path], kind="checkpoint")
    plan = load_plan(plan_path)
    config = load_config(model_path)
    family_of(config)
    plan = cover_mtp(plan, checkpoint_skeleton(config, model_path))  # a plan made before MTP layers were known
    want = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD_BYTES
    if not in_memory and has_safetensors(model_path) and not plan.info.get("tied"):  # tied: every expert stays
        check_quantization(config, str(model_path))
        _stream(model_path, out, plan, None, want, shard_bytes, overwrite, progress, drop_mtp)
        return plan
    if plan.kind == "merge":
        from .merge import merge_checkpoint

        return merge_checkpoint(model_path, out, plan_path=plan_path, overwrite=overwrite, dtype=dtype,
                                drop_mtp=drop_mtp)
    model, tok = load_model(model_path, dtype=load_dtype(want, model_path))
    _write(model, tok, plan, model_path, out, overwrite, None, want, shard_bytes, drop_mtp)
    return plan


def _stream(source: Any, out: Any, plan: ExpertPlan, stats_meta: dict[str, Any] | None, dtype: torch.dtype | None,
            shard_bytes: int, overwrite: bool, progress: bool, drop_mtp: bool = False) -> None:
    def card(out_model: nn.Module, before: int, after: int) -> str:
        write = merge_card if isinstance(plan, MergePlan) else prune_card
        return write(source=str(source), plan=plan, params_before=before, params_after=after,  # type: ignore[arg-type]
                     model=out_model, stats_info=stats_meta)

    rewrite_pruned(source, out, plan, card=card, dtype=dtype, max_shard_bytes=shard_bytes, overwrite=overwrite,
                   progress=progress, drop_mtp=drop_mtp)


def _write(model: nn.Module, tok: Any, plan: ExpertPlan, source: Any, out: Any, overwrite: bool,
           stats_meta: dict[str, Any] | None, dtype: torch.dtype | None = None,
           shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, drop_mtp: bool = False) -> None:
    check_uniform(moe_layers(model))
    before = count_parameters(model)
    plan.check_writable()  # refuse before any slicing work
    check_mtp_writable(model, source, drop_mtp)
    apply_plan(model, plan)
    if drop_mtp:
        model.config.moe_slim["dropped_mtp"] = drop_mtp_layers(model)
    after = count_parameters(model)
    plan.info.update(params_before=before, params_after=after)
    card = prune_card(source=str(source), plan=plan, params_before=before, params_after=after, model=model,
                      stats_info=stats_meta)
    save_checkpoint(model, tok, out, card=card, plan=plan, overwrite=overwrite, dtype=dtype, source=source,
                    max_shard_bytes=shard_bytes)
