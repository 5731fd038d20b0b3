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
from ..experts.observe import observe
from ..experts.plan import check_ratio
from ..experts.prune import count_parameters
from ..experts.stats import RouterStats
from ..families import family_of
from ..modeling import devices
from ..modeling.hub import resolve_model
from ..modeling.loading import (
    load_config,
    load_model,
    output_dtype,
)
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
    **choices: Any,
) -> MergePlan:
    """Merge a checkpoint's experts and write the smaller checkpoint (plan, permutations and card beside it).

    Decisions come from saved statistics with samples (``stats_path``), from calibration text observed
    here (``calib``; ``samples`` tokens per domain, default ``max_tokens``), or from a saved merge plan
    (``plan_path``, replayed without statistics). ``choices`` go to :func:`~moe_slim.experts.merge.driver.merge_model`
    (``router_row``, ``tied``, ``align``, ``weighting``, ``pca_dims``, ``dominants``, ``global_dominants``).
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    data_dir = data_dir_or_default(data_dir)
    check_output(out, overwrite, inputs=[model_path, stats_path, plan_path, data_dir, *calibration_inputs(calib)])
    family_of(load_config(model_path))
    save_dtype = output_dtype(dtype, model_path)  # merging computes in float32 on CPUs; the output keeps the source dtype
    dev = devices.resolve_device(device)
    run = dict(device=dev, dtype=devices.compute_dtype(compute_dtype, dev, model_path))
    stats = None
    if plan_path is not None:
        plan = MergePlan.load(plan_path)
        model, tok = load_model(model_path, **run)
        before = count_parameters(model)
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
        texts = None
        if calib is not None:
            texts, _budget = calibration_texts(calib, data_dir)
        model, tok = load_model(model_path, **run)
        if tok is None and calib is not None:
            raise MoeSlimError(f"{model_path} has no tokenizer; merging with --calib needs one to read the text")
        before = count_parameters(model)
        if stats is None and not sequential:
            stats = observe(model, tok, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=_budget,
                            samples=samples or max_tokens)
        plan = merge_model(model, stats, method, ratio, mix=mix, group_size=group_size, max_tokens=max_tokens,
                           align_tokens=align_tokens, grouping=grouping, sequential=sequential, calibration=texts,
                           tokenizer=tok, seq_len=seq_len, batch_size=batch_size, seed=seed, log=log, **choices)
        plan.info.update(stats_path=str(stats_path) if stats_path else None,
                         calibration=calib if isinstance(calib, str) else ("in-memory" if calib else None))
    after = count_parameters(model)
    plan.info.update(params_before=before, params_after=after, source=str(model_path))
    card = merge_card(source=str(model_path), plan=plan, params_before=before, params_after=after, model=model,
                      stats_info=stats.meta if stats is not None else None)
    if plan_only:  # the decisions without the checkpoint (they replay with apply/eval --plan)
        write_plan(plan, out, overwrite=overwrite)
    else:
        save_checkpoint(model, tok, out, card=card, plan=plan, overwrite=overwrite, dtype=save_dtype)
    return plan
