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
from ..experts.merge.methods import (
    DEFAULT_ALIGN_TOKENS,
    DEFAULT_SAMPLE_TOKENS,
    method_spec,
    samples_hint,
)
from ..experts.merge.plan import MergePlan
from ..experts.merge.at_size import LayersFromShards
from ..experts.observe import observe, observe_layerwise
from ..experts.plan import check_ratio
from ..experts.prune import count_parameters
from ..experts.stats import RouterStats
from ..families import family_of
from ..modeling import devices
from ..modeling.hub import resolve_model
from ..checkpoint.rewrite import rewrite_pruned
from ..checkpoint.shard_writer import DEFAULT_MAX_SHARD_BYTES, parse_size
from ..modeling.dispatch import prepare_model
from ..modeling.loading import (
    load_config,
    load_model,
    load_tokenizer,
    output_dtype,
    parse_dtype,
)
from ..modeling.materialize import WeightSource
from ..modeling.ondisk import meta_model
from ..modeling.shards import has_safetensors
from ..outputs import check_output
from .plans import write_plan


def merge_checkpoint(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "ream",
    ratio: float | None = None,
    stats_path: str | os.PathLike | None = None,
    calib: str | dict[str, list[str]] | None = None,
    plan_path: str | os.PathLike | None = None,
    mix: dict[str, float] | None = None,
    group_size: int | None = None,
    max_tokens: int = DEFAULT_SAMPLE_TOKENS,
    align_tokens: int = DEFAULT_ALIGN_TOKENS,
    samples: int | None = None,
    grouping: str | None = None,
    sequential: bool = False,
    seq_len: int = 512,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    compute_dtype: str | torch.dtype | None = None,
    log: Callable[[str], None] | None = None,
    plan_only: bool = False,
    in_memory: bool = False,
    max_shard_size: str | int | None = None,
    **choices: Any,
) -> MergePlan:
    """Merge a checkpoint's experts and write the smaller checkpoint (plan, permutations and card beside it).

    Decisions come from saved statistics with samples (``stats_path``), from calibration text observed
    here (``calib``; ``samples`` tokens per domain, default ``max_tokens``), or from a saved merge plan
    (``plan_path``, replayed without statistics). A safetensors source is merged at size: one MoE
    layer's weights in memory at a time, read from the shards (sequentially through a layer-wise run),
    and the output streamed shard by shard in the source dtype; ``in_memory=True`` loads the model.
    ``choices`` go to :func:`~moe_slim.experts.merge.driver.merge_model` (``router_row``, ``tied``, ``align``,
    ``weighting``, ``pca_dims``, ``dominants``, ``global_dominants``, ``protect_super``); a tied merge
    (nothing shrinks) is made in memory.
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    data_dir = data_dir_or_default(data_dir)
    check_output(out, overwrite, inputs=[model_path, stats_path, plan_path, data_dir, *calibration_inputs(calib)],
                 kind="plan" if plan_only else "checkpoint")
    family_of(load_config(model_path))
    save_dtype = output_dtype(dtype, model_path)  # merging computes in float32 on CPUs; the output keeps the source dtype
    dev = devices.resolve_device(device)
    run = dict(device=dev, dtype=devices.compute_dtype(compute_dtype, dev, model_path))
    at_size = not in_memory and has_safetensors(model_path) and not choices.get("tied")
    stats = None
    texts = None
    if plan_path is not None:
        plan = MergePlan.load(plan_path)
        at_size = at_size and not plan.info.get("tied")  # a tied merge keeps every expert: replayed in memory
        if at_size:
            model, tok = prepare_model(meta_model(load_config(model_path))), None
        else:
            model, tok = load_model(model_path, **run)
        before = count_parameters(model)
        if not at_size:
            apply_merge_plan(model, plan)
    else:
        method_spec(method, grouping)
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
            model, tok = prepare_model(meta_model(load_config(model_path))), load_tokenizer(model_path)
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
        plan = merge_model(model, stats, method, ratio, mix=mix, group_size=group_size, max_tokens=max_tokens,
                           align_tokens=align_tokens, grouping=grouping, sequential=sequential, calibration=texts,
                           tokenizer=tok, seq_len=seq_len, batch_size=batch_size, seed=seed, log=log, access=access,
                           **choices)
        plan.info.update(stats_path=str(stats_path) if stats_path else None,
                         calibration=calib if isinstance(calib, str) else ("in-memory" if calib else None))
    if at_size:
        plan.info["at_size"] = True
        return _write_at_size(model_path, out, plan, model, before, stats, want=parse_dtype(dtype),
                              max_shard_size=max_shard_size, overwrite=overwrite, plan_only=plan_only)
    after = count_parameters(model)
    plan.info.update(params_before=before, params_after=after, source=str(model_path))
    card = merge_card(source=str(model_path), plan=plan, params_before=before, params_after=after, model=model,
                      stats_info=stats.meta if stats is not None else None)
    if plan_only:  # the decisions without the checkpoint (they replay with apply/eval --plan)
        write_plan(plan, out, overwrite=overwrite)
    else:
        save_checkpoint(model, tok, out, card=card, plan=plan, overwrite=overwrite, dtype=save_dtype)
    return plan


def _write_at_size(model_path: str | os.PathLike, out: str | os.PathLike, plan: MergePlan, model: torch.nn.Module,
                   before: int, stats: RouterStats | None, *, want: torch.dtype | None, max_shard_size: str | int | None,
                   overwrite: bool, plan_only: bool) -> MergePlan:
    """The merged checkpoint streamed from the source's shards, one MoE layer merged at a time."""
    plan.info.update(params_before=before, source=str(model_path))
    if plan_only:
        write_plan(plan, out, overwrite=overwrite)
        return plan

    def card(out_model: torch.nn.Module, before: int, after: int) -> str:
        plan.info.update(params_after=after)
        return merge_card(source=str(model_path), plan=plan, params_before=before, params_after=after,
                          model=out_model, stats_info=stats.meta if stats is not None else None)

    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD_BYTES
    rewrite_pruned(model_path, out, plan, card=card, dtype=want, max_shard_bytes=shard_bytes, overwrite=overwrite,
                   progress=False)
    return plan
