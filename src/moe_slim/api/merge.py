"""``moe-slim merge``: fold experts together and write the smaller checkpoint (or only the plan)."""


from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ..checkpoint.cards import merge_card
from ..checkpoint.save import save_checkpoint
from ..data.calib import calibration_inputs, calibration_texts
from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..experts.merge.apply import apply_merge_plan
from ..experts.merge.driver import merge_model
from ..experts.merge.config import MergeOptions
from ..experts.merge.methods import samples_hint
from ..experts.merge.plan import MergePlan
from ..experts.merge.at_size import LayersFromShards
from ..experts.observe import observe, observe_layerwise
from ..experts.plan import check_ratio
from ..experts.prune import count_parameters
from ..experts.stats import RouterStats
from ..families import family_of
from ..modeling import devices
from ..modeling.hub import resolve_model
from ..checkpoint.rewrite import refuse_quantized_merge, rewrite_pruned
from ..checkpoint.shard_writer import DEFAULT_MAX_SHARD_BYTES, parse_size
from ..modeling.dispatch import prepare_model
from ..modeling.loading import (
    load_config,
    load_model,
    load_tokenizer,
    parse_dtype,
)
from ..modeling.materialize import WeightSource
from ..modeling.mtp import check_mtp_writable, checkpoint_skeleton, drop_mtp as drop_mtp_layers
from ..modeling.shards import has_safetensors
from ..outputs import check_output
from .plans import plan_parameters, write_plan


def merge_checkpoint(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str | MergeOptions = "ream",
    ratio: float | None = None,
    stats_path: str | os.PathLike | None = None,
    calib: str | dict[str, list[str]] | None = None,
    plan_path: str | os.PathLike | None = None,
    mix: dict[str, float] | None = None,
    samples: int | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    compute_dtype: str | torch.dtype | None = None,
    log: Callable[[str], None] | None = None,
    plan_only: bool = False,
    in_memory: bool = False,
    max_shard_size: str | int | None = None,
    progress: bool = False,
    drop_mtp: bool = False,
    **choices: Any,
) -> MergePlan:
    """Merge a checkpoint's experts and write the smaller checkpoint (plan, permutations and card beside it).

    Decisions come from saved statistics with samples (``stats_path``), from calibration text observed
    here (``calib``; ``samples`` tokens per domain, default ``max_tokens``), or from a saved merge plan
    (``plan_path``, replayed without statistics). A safetensors source is merged at size: one MoE
    layer's weights in memory at a time, read from the shards (sequentially through a layer-wise run),
    and the output streamed shard by shard in the source dtype; ``in_memory=True`` loads the model.
    ``method`` is a method or preset name, or a :class:`~moe_slim.experts.merge.config.MergeOptions`;
    ``choices`` are its fields one by one (``group_size``, ``weighting``, ``sequential``, ``tied``, ...),
    checked before anything is loaded; a tied merge (nothing shrinks) is made in memory.
    MTP layers stored in the checkpoint are merged like every MoE layer; ``drop_mtp`` leaves them out of the
    output and sets the config's MTP layer count to 0.
    """
    opts = MergeOptions.build(method, **choices)
    resolved = opts.resolved()  # a bad combination fails before any model is read
    sequential, max_tokens = resolved.sequential, resolved.max_tokens
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    data_dir = data_dir_or_default(data_dir)
    check_output(out, overwrite, inputs=[model_path, stats_path, plan_path, data_dir, *calibration_inputs(calib)],
                 kind="plan" if plan_only else "checkpoint")
    config = load_config(model_path)
    family_of(config)
    refuse_quantized_merge(config, model_path)
    save_dtype = parse_dtype(dtype)  # None: computed in float32 on CPUs, each tensor written in its source dtype
    dev = devices.resolve_device(device)
    run = dict(device=dev, dtype=devices.compute_dtype(compute_dtype, dev, model_path))
    at_size = not in_memory and has_safetensors(model_path) and not resolved.tied
    stats = None
    texts = None
    if plan_path is not None:
        plan = MergePlan.load(plan_path)
        at_size = at_size and not plan.info.get("tied")  # a tied merge keeps every expert: replayed in memory
        if at_size:
            model, tok = prepare_model(checkpoint_skeleton(load_config(model_path), model_path)), None
        else:
            model, tok = load_model(model_path, **run)
        before = count_parameters(model)
        if not at_size:
            apply_merge_plan(model, plan)
    else:
        if ratio is None:
            raise MoeSlimError("merging needs --ratio (the share of experts removed), or --plan")
        check_ratio(ratio)
        if stats_path is None and calib is None:
            raise MoeSlimError("merging needs --stats (observed with --samples) or --calib text, or a --plan")
        if sequential and calib is None:
            raise MoeSlimError("sequential merging re-runs the calibration text through the merged layers; give --calib")
        if stats_path is not None:
            stats = RouterStats.load(stats_path)
            if stats.samples is None and not sequential:
                raise MoeSlimError(f"the statistics in {stats_path} have no token samples, which merging needs; "
                                   + samples_hint(str(model_path)))
        budget = None
        if calib is not None:
            texts, budget = calibration_texts(calib, data_dir)
        if at_size:
            model = prepare_model(checkpoint_skeleton(load_config(model_path), model_path))
            tok = load_tokenizer(model_path)
        else:
            model, tok = load_model(model_path, **run)
        if tok is None and calib is not None:
            raise MoeSlimError(f"{model_path} has no tokenizer; merging with --calib needs one to read the text")
        before = count_parameters(model)
        settings = dict(seq_len=seq_len, batch_size=batch_size, max_tokens=budget, samples=samples or max_tokens)
        if stats is None and not sequential:
            stats = (observe_layerwise(model_path, tok, texts, **settings, **run) if at_size  # type: ignore[arg-type]
                     else observe(model, tok, texts, **settings))  # type: ignore[arg-type]
        access = LayersFromShards(WeightSource(model_path, model), sequential=sequential, **run) if at_size else None
        plan = merge_model(model, stats, opts, ratio, mix=mix, calibration=texts, tokenizer=tok, seq_len=seq_len,
                           batch_size=batch_size, log=log, progress=progress, access=access)
        plan.info.update(stats_path=str(stats_path) if stats_path else None,
                         calibration=calib if isinstance(calib, str) else ("in-memory" if calib else None))
    if at_size:
        plan.info["at_size"] = True
        return _write_at_size(model_path, out, plan, model, before, stats, want=parse_dtype(dtype),
                              max_shard_size=max_shard_size, overwrite=overwrite, plan_only=plan_only,
                              drop_mtp=drop_mtp)
    after = count_parameters(model)
    plan.info.update(params_before=before, params_after=after, source=str(model_path))
    card = merge_card(source=str(model_path), plan=plan, params_before=before, params_after=after, model=model,
                      stats_info=stats.meta if stats is not None else None)
    if plan_only:  # the decisions without the checkpoint (they replay with apply/eval --plan)
        write_plan(plan, out, overwrite=overwrite)
    else:
        check_mtp_writable(model, model_path, drop_mtp)
        if drop_mtp:
            dropped = drop_mtp_layers(model)
            model.config.moe_slim = dict(getattr(model.config, "moe_slim", None) or {}, dropped_mtp=dropped)
        save_checkpoint(model, tok, out, card=card, plan=plan, overwrite=overwrite, dtype=save_dtype, source=model_path)
    return plan


def _write_at_size(model_path: str | os.PathLike, out: str | os.PathLike, plan: MergePlan, model: torch.nn.Module,
                   before: int, stats: RouterStats | None, *, want: torch.dtype | None, max_shard_size: str | int | None,
                   overwrite: bool, plan_only: bool, drop_mtp: bool = False) -> MergePlan:
    """The merged checkpoint streamed from the source's shards, one MoE layer merged at a time."""
    plan.info.update(params_before=before, source=str(model_path))
    if plan_only:
        plan.info["params_after"] = plan_parameters(load_config(model_path), plan)[1]
        write_plan(plan, out, overwrite=overwrite)
        return plan

    def card(out_model: torch.nn.Module, before: int, after: int) -> str:
        plan.info.update(params_after=after)
        return merge_card(source=str(model_path), plan=plan, params_before=before, params_after=after,
                          model=out_model, stats_info=stats.meta if stats is not None else None)

    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD_BYTES
    rewrite_pruned(model_path, out, plan, card=card, dtype=want, max_shard_bytes=shard_bytes, overwrite=overwrite,
                   progress=False, drop_mtp=drop_mtp)
    return plan
