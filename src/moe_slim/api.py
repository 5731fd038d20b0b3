"""The Python API behind ``moe-slim observe | prune | apply | merge | sft``: checkpoint in, checkpoint out.

Each function validates everything it can before any heavy work and writes nothing on error. The
in-memory building blocks live in :mod:`moe_slim.experts` (observe, stats, criteria, plan, prune,
merge) and :mod:`moe_slim.recover`; the ones a README example needs are re-exported here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint.cards import merge_card, prune_card, sft_card
from .checkpoint.rewrite import check_quantization, rewrite_pruned
from .checkpoint.save import save_checkpoint
from .checkpoint.shard_writer import DEFAULT_MAX_SHARD_BYTES, parse_size
from .data.calib import calibration_inputs, calibration_texts
from .data.paths import data_dir_or_default
from .errors import MoeSlimError
from .experts import distributed
from .experts.criteria import ALL_CRITERIA, score
from .experts.merge.apply import apply_merge_plan
from .experts.merge.driver import merge_model
from .experts.merge.methods import (
    DEFAULT_ALIGN_TOKENS,
    DEFAULT_SAMPLE_TOKENS,
    method_spec,
    samples_hint,
)
from .experts.merge.plan import MergePlan
from .experts.observe import DEFAULT_CACHE_BYTES, observe, observe_layerwise
from .experts.plan import ExpertPlan, check_ratio, make_plan
from .experts.prune import apply_plan, count_parameters
from .experts.stats import RouterStats
from .families import check_uniform, family_of, moe_layers
from .modeling import devices
from .modeling.loading import (
    load_config,
    load_model,
    load_tokenizer,
    output_dtype,
    parse_dtype,
)
from .modeling.hub import resolve_model
from .modeling.ondisk import meta_model
from .modeling.shards import ITEMSIZE, ShardedCheckpoint, has_safetensors, source_dtype
from .outputs import atomic_dir, check_output
from .recover.loop import SftResult, sft
from .recover.data import load_sft_data
from .recover.modes import check_mode

__all__ = [
    "ExpertPlan", "MergePlan", "RouterStats", "apply_merge_plan", "apply_plan", "apply_checkpoint", "load_model",
    "merge_checkpoint", "merge_model", "observe", "observe_checkpoint", "parse_weights", "plan_for",
    "prune_checkpoint", "score", "sft", "sft_checkpoint",
]


def observe_checkpoint(
    model_path: str | os.PathLike,
    calib: str | dict[str, list[str]],
    out: str | os.PathLike,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | dict[str, int] | None = None,
    pack: bool = True,
    device_map: str | None = None,
    data_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    samples: int = 0,
    layerwise: bool | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    work_dir: str | os.PathLike | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> RouterStats:
    """Observe a checkpoint on calibration text (a spec string or texts per domain) and save the stats.

    ``samples=N`` also keeps up to N tokens per domain and MoE layer for expert merging.
    ``layerwise`` keeps one transformer layer in memory at a time (default: when the model would
    not fit in the device's free memory); its progress is kept in ``work_dir`` (default: a hidden
    directory beside ``out``) so an interrupted run resumes. ``device``/``dtype``: where and in what
    precision the model runs (default: the GPU in the checkpoint's dtype, or float32 on a CPU).
    Under torchrun/accelerate with several processes each observes its share and rank 0 writes.
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    data_dir = data_dir_or_default(data_dir)
    check_output(out, overwrite, inputs=[model_path, data_dir, work_dir, *calibration_inputs(calib)])
    config = load_config(model_path)
    family_of(config)  # unsupported family: fail before loading weights
    texts, budget = calibration_texts(calib, data_dir)
    if max_tokens is None:
        max_tokens = budget
    dev = devices.resolve_device(device)
    dist = distributed.context(dev)
    if dist is not None and dev.type == "cuda":  # one GPU per process
        dev = devices.resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    run_dtype = devices.compute_dtype(dtype, dev, model_path)
    if layerwise is None:
        layerwise = device_map is None and has_safetensors(model_path) and needs_layerwise(model_path, run_dtype, dev)
    if layerwise and not has_safetensors(model_path):
        raise MoeSlimError(f"layer-wise observation reads safetensors weights and {model_path} has none "
                           "(convert it to safetensors, or observe without --layerwise)")
    if layerwise:
        tok = load_tokenizer(model_path)
    else:
        model, tok = load_model(model_path, device_map=device_map, dtype=run_dtype,
                                device=None if device_map else dev)
    if tok is None:
        raise MoeSlimError(f"{model_path} has no tokenizer; observation needs one to read calibration text")
    settings = dict(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, pack=pack, progress=progress,
                    samples=samples, dist=dist)
    if layerwise:
        work = Path(work_dir) if work_dir is not None else Path(out).parent / f".{Path(out).name}.layerwise"
        if dist is not None:
            work = work.with_name(f"{work.name}-rank{dist.rank}")
        stats = observe_layerwise(model_path, tok, texts, device=dev, dtype=run_dtype, work_dir=work,
                                  cache_bytes=cache_bytes, **settings)
    else:
        stats = observe(model, tok, texts, **settings)
    stats.meta["model_path"] = str(model_path)
    stats.meta["calibration"] = calib if isinstance(calib, str) else "in-memory"
    if dist is None or dist.main:
        stats.save(out, overwrite=overwrite)
    return stats


def needs_layerwise(model_path: str | os.PathLike, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the whole model in ``dtype`` would take more than 80% of the device's free memory."""
    ck = ShardedCheckpoint(model_path)
    elements = sum(e.nbytes // ITEMSIZE[e.dtype] for e in ck.entries.values())
    return elements * torch.tensor([], dtype=dtype).element_size() > 0.8 * devices.available_memory(device)


def plan_for(
    model: nn.Module,
    stats: RouterStats,
    *,
    criterion: str = "reap",
    ratio: float | None = None,
    mix: dict[str, float] | None = None,
    reference: dict[str, float] | None = None,
    budget: str = "uniform",
    floor: int | None = None,
    seed: int = 0,
) -> ExpertPlan:
    """Score experts on ``mix`` and turn the scores into a plan for ``model``."""
    if criterion not in ALL_CRITERIA:
        raise MoeSlimError(f"unknown criterion '{criterion}' (choose from: {', '.join(ALL_CRITERIA)})")
    if ratio is not None:
        check_ratio(ratio)
    stats.check_model(model)
    layers = moe_layers(model)
    scores = score(stats, criterion, mix=mix, reference=reference, seed=seed)
    info = {"criterion": criterion, "mix": mix, "reference": reference, "seed": seed,
            "stats_fingerprint": stats.meta.get("model_fingerprint"), "stats_domains": list(stats.domains)}
    return make_plan(scores, family=layers[0].family, config=model.config, layer_names=[l.name for l in layers],
                     ratio=ratio, budget=budget, floor=floor, info=info)


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
) -> ExpertPlan:
    """Prune a checkpoint with saved statistics and write the result (plan.json and card beside it).

    ``plan_only`` writes just ``OUT/plan.json``, for any budget (different counts per layer too):
    evaluate it in memory with ``moe-slim eval MODEL --plan OUT/plan.json``. ``ratio`` is the share
    of experts removed (uniform and global budgets); a counts file needs none.

    A safetensors checkpoint is rewritten by streaming its shards (:mod:`moe_slim.checkpoint.rewrite`:
    the model is never built, every tensor keeps its dtype); ``in_memory=True`` loads the model,
    slices it and saves it instead. ``dtype`` converts the weights (default: keep the source's).
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    check_output(out, overwrite, inputs=[model_path, stats_path])
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
        model, tok = meta_model(config), None
    else:
        model, tok = load_model(model_path, dtype=want or source_dtype(model_path))
    plan = plan_for(model, stats, criterion=criterion, ratio=ratio, mix=mix, reference=reference, budget=budget,
                    floor=floor, seed=seed)
    plan.info["stats_path"] = str(stats_path)
    if plan_only:
        write_plan(plan, out, overwrite=overwrite)
    elif streaming:
        _stream(model_path, out, plan, stats.meta, want, shard_bytes, overwrite, progress)
    else:
        _write(model, tok, plan, model_path, out, overwrite, stats.meta, want, shard_bytes)
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
) -> ExpertPlan:
    """Apply a saved plan to a checkpoint (no statistics needed); streamed like :func:`prune_checkpoint`.

    A merge plan (kind ``merge``) is replayed by :func:`merge_checkpoint`, with the
    neuron permutations saved beside it.
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    check_output(out, overwrite, inputs=[model_path, plan_path])
    plan = ExpertPlan.load(plan_path)
    if plan.kind == "merge":
        return merge_checkpoint(model_path, out, plan_path=plan_path, overwrite=overwrite, dtype=dtype)
    config = load_config(model_path)
    family_of(config)
    want = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD_BYTES
    if not in_memory and has_safetensors(model_path):
        check_quantization(config, str(model_path))
        _stream(model_path, out, plan, None, want, shard_bytes, overwrite, progress)
        return plan
    model, tok = load_model(model_path, dtype=want or source_dtype(model_path))
    _write(model, tok, plan, model_path, out, overwrite, None, want, shard_bytes)
    return plan


def write_plan(plan: ExpertPlan, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """A plan without a checkpoint: ``OUT/plan.json`` (and a merge plan's permutations beside it)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        plan.write_files(tmp)
    return Path(out) / "plan.json"


def load_plan(path: str | os.PathLike) -> ExpertPlan:
    """A prune or merge plan file (a merge plan with its permutations)."""
    plan = ExpertPlan.load(path)
    return MergePlan.load(path) if plan.kind == "merge" else plan


def apply_plan_file(model: nn.Module, path: str | os.PathLike) -> ExpertPlan:
    """Apply a saved prune or merge plan to ``model`` in memory (any counts per layer); return it."""
    plan = load_plan(path)
    if plan.kind == "merge":
        apply_merge_plan(model, plan)
    else:
        apply_plan(model, plan)
    return plan


def _stream(source: Any, out: Any, plan: ExpertPlan, stats_meta: dict[str, Any] | None, dtype: torch.dtype | None,
            shard_bytes: int, overwrite: bool, progress: bool) -> None:
    def card(out_model: nn.Module, before: int, after: int) -> str:
        return prune_card(source=str(source), plan=plan, params_before=before, params_after=after, model=out_model,
                          stats_info=stats_meta)

    rewrite_pruned(source, out, plan, card=card, dtype=dtype, max_shard_bytes=shard_bytes, overwrite=overwrite,
                   progress=progress)


def _write(model: nn.Module, tok: Any, plan: ExpertPlan, source: Any, out: Any, overwrite: bool,
           stats_meta: dict[str, Any] | None, dtype: torch.dtype | None = None,
           shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    check_uniform(moe_layers(model))
    before = count_parameters(model)
    plan.check_writable()  # refuse before any slicing work
    apply_plan(model, plan)
    after = count_parameters(model)
    plan.info.update(params_before=before, params_after=after)
    card = prune_card(source=str(source), plan=plan, params_before=before, params_after=after, model=model,
                      stats_info=stats_meta)
    save_checkpoint(model, tok, out, card=card, plan=plan, overwrite=overwrite, dtype=dtype or source_dtype(source),
                    max_shard_bytes=shard_bytes)


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``translation=3,general=1`` -> ``{"translation": 3.0, "general": 1.0}``."""
    if text is None or text == "":
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            out[name.strip()] = 1.0
            continue
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise MoeSlimError(f"mix weight '{part}' is not NAME=NUMBER") from exc
    if any(v < 0 for v in out.values()) or sum(out.values()) <= 0:
        raise MoeSlimError(f"mix weights must be non-negative and not all zero (got '{text}')")
    return out



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
    group_size: int = 16,
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
) -> MergePlan:
    """Merge a checkpoint's experts and write the smaller checkpoint (plan, permutations and card beside it).

    Decisions come from saved statistics with samples (``stats_path``), from calibration text observed
    here (``calib``; ``samples`` tokens per domain, default ``max_tokens``), or from a saved merge plan
    (``plan_path``, replayed without statistics).
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
                           tokenizer=tok, seq_len=seq_len, batch_size=batch_size, seed=seed, log=log)
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



def sft_checkpoint(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str,
    steps: int,
    mode: str = "experts",
    merge_lora: bool = False,
    overwrite: bool = False,
    device_map: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    compute_dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> SftResult:
    """``moe-slim sft``: load, fine-tune, write a checkpoint (or adapter) with a model card, atomically.

    Training runs in float32 on CPUs; the checkpoint is written in the source's dtype (or ``dtype``).
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    kwargs["data_dir"] = data_dir_or_default(kwargs.get("data_dir"))
    check_output(out, overwrite, inputs=[model_path, kwargs["data_dir"]])
    mode = check_mode(mode)
    if not isinstance(steps, int) or steps <= 0:
        raise MoeSlimError(f"--steps must be a positive integer (got {steps!r})")
    save_dtype = output_dtype(dtype, model_path)
    data = load_sft_data(data, data_dir=kwargs["data_dir"], val_data=kwargs.pop("val_data", None),
                         seed=kwargs.get("seed", 0))  # bad data fails before the model is loaded
    dev = devices.resolve_device(device)
    model, tok = load_model(model_path, device_map=device_map, dtype=devices.compute_dtype(compute_dtype, dev, model_path),
                            device=None if device_map else dev)
    result = sft(model, tok, data, steps=steps, mode=mode, merge_lora=merge_lora, cpu=dev.type == "cpu", **kwargs)
    source = str(model_path)
    log_json = result.to_dict()
    log_json["source"] = source
    if mode == "lora" and not result.merged:
        card = sft_card(source=source, result=result, adapter=True)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            result.model.peft_config["default"].base_model_name_or_path = os.path.abspath(source)
            result.model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            (tmp / "sft.json").write_text(json.dumps(log_json, indent=2, sort_keys=True))
            (tmp / "README.md").write_text(card)
        return result
    plan = None
    plan_path = Path(model_path) / "plan.json"
    if plan_path.is_file():
        try:
            plan = ExpertPlan.load(plan_path)
        except Exception:
            plan = None
    save_checkpoint(result.model, tok, out, card=sft_card(source=source, result=result, adapter=False), plan=plan,
                    extra_json={"sft.json": log_json}, dtype=save_dtype, overwrite=overwrite)
    return result
