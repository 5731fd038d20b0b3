"""``moe-slim sft``: a short fine-tune that heals a pruned or merged checkpoint."""


from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.cards import sft_card
from ..checkpoint.save import save_checkpoint, tidy_checkpoint_files
from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..experts.plan import ExpertPlan
from ..modeling import devices
from ..modeling.hub import resolve_model
from ..modeling.loading import load_model, parse_dtype
from ..outputs import atomic_dir, check_output
from ..recover.data import load_sft_data
from ..recover.distill import DEFAULT_TOPK, check_loss
from ..recover.loop import SftResult, sft
from ..recover.modes import check_mode


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
    loss: str = "ce",
    teacher: str | os.PathLike | None = None,
    teacher_cache: str | os.PathLike | None = None,
    teacher_topk: int = DEFAULT_TOPK,
    layerwise_teacher: bool = False,
    **kwargs: Any,
) -> SftResult:
    """``moe-slim sft``: load, fine-tune, write a checkpoint (or adapter) with a model card, atomically.

    Training runs in float32 on CPUs; the checkpoint is written in the source's dtype (or ``dtype``).
    ``loss`` ``kd`` / ``kd+ce`` distils from ``teacher`` (the unpruned checkpoint): loaded beside the
    student and run on the fly, or, with ``teacher_cache`` (a file path) or ``layerwise_teacher``, its
    top-``teacher_topk`` distributions are computed first (streamed one layer at a time with
    ``layerwise_teacher``) and cached, and the student is loaded only after the teacher is gone.
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    kwargs["data_dir"] = data_dir_or_default(kwargs.get("data_dir"))
    loss = check_loss(loss)
    if loss == "ce" and (teacher is not None or teacher_cache is not None):
        raise MoeSlimError("a teacher is only used by --loss kd or kd+ce (add --loss kd, or drop --teacher)")
    if loss != "ce" and teacher is None and teacher_cache is None:
        raise MoeSlimError(f"--loss {loss} distils from the unpruned model: give --teacher ORIGINAL")
    if layerwise_teacher and teacher is None:
        raise MoeSlimError("--layerwise-teacher streams the --teacher checkpoint: give --teacher ORIGINAL")
    if teacher is not None:
        teacher = resolve_model(teacher)
        _check_vocab(teacher, model_path)
    check_output(out, overwrite, inputs=[p for p in (model_path, kwargs["data_dir"], teacher) if p is not None],
                 kind="checkpoint")
    mode = check_mode(mode)
    if not isinstance(steps, int) or steps <= 0:
        raise MoeSlimError(f"--steps must be a positive integer (got {steps!r})")
    save_dtype = parse_dtype(dtype)  # None: computed in float32 on CPUs, each tensor written in its source dtype
    data = load_sft_data(data, data_dir=kwargs["data_dir"], val_data=kwargs.pop("val_data", None),
                         seed=kwargs.get("seed", 0))  # bad data fails before the model is loaded
    dev = devices.resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="moe_slim_teacher_") as scratch:
        if loss != "ce":
            kwargs["teacher"] = _teacher(teacher, model_path, data, teacher_cache or (
                Path(scratch) / "teacher.safetensors" if layerwise_teacher else None), teacher_topk, layerwise_teacher,
                dev, devices.compute_dtype(compute_dtype, dev, teacher or model_path), steps, kwargs)
        return _train_and_write(model_path, out, data, steps, mode, merge_lora, overwrite, device_map, dev,
                                compute_dtype, save_dtype, loss, teacher, kwargs)


def _train_and_write(model_path: Any, out: Any, data: Any, steps: int, mode: str, merge_lora: bool, overwrite: bool,
                     device_map: Any, dev: torch.device, compute_dtype: Any, save_dtype: Any, loss: str, teacher: Any,
                     kwargs: dict[str, Any]) -> SftResult:
    model, tok = load_model(model_path, device_map=device_map, dtype=devices.compute_dtype(compute_dtype, dev, model_path),
                            device=None if device_map else dev)
    result = sft(model, tok, data, steps=steps, mode=mode, merge_lora=merge_lora, cpu=dev.type == "cpu", loss=loss,
                 **kwargs)
    if result.teacher is not None and teacher is not None:
        result.teacher["source"] = str(teacher)
    source = str(model_path)
    log_json = result.to_dict()
    log_json["source"] = source
    if mode == "lora" and not result.merged:
        card = sft_card(source=source, result=result, adapter=True)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            result.model.peft_config["default"].base_model_name_or_path = os.path.abspath(source)
            result.model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            tidy_checkpoint_files(tmp)
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
                    extra_json={"sft.json": log_json}, dtype=save_dtype, source=model_path, overwrite=overwrite)
    return result


def _check_vocab(teacher: Any, student: Any) -> None:
    from ..modeling.loading import load_config

    vt, vs = (getattr(load_config(p), "vocab_size", None) for p in (teacher, student))
    if vt != vs:
        raise MoeSlimError(f"teacher {teacher} has a vocabulary of {vt} tokens, the student {vs}: distillation "
                           "needs the same tokenizer (give the model the student was pruned from)")


def _teacher(teacher: Any, student_path: Any, data: Any, cache: Any, k: int, layerwise: bool, dev: torch.device,
             dtype: Any, steps: int, kwargs: dict[str, Any]) -> Any:
    """The teacher a KD run reads: a top-k cache (built first, before the student is loaded, when
    ``cache`` or ``layerwise`` asks for one), else the teacher model loaded whole."""
    if cache is None and not layerwise:
        return load_model(teacher, dtype=dtype, device=dev)[0]
    from transformers import AutoTokenizer

    from ..recover.teacher_cache import CachedTeacher, build_teacher_cache

    if teacher is None:  # a cache built before: read as it is (sft checks each batch against it)
        return CachedTeacher(cache)
    tok = AutoTokenizer.from_pretrained(str(student_path))
    settings = {k_: kwargs[k_] for k_ in ("grad_accum", "batch_size", "seq_len", "seed", "val_examples") if k_ in kwargs}
    return build_teacher_cache(teacher, tok, data, cache, steps=steps, k=k, data_dir=kwargs["data_dir"],
                               layerwise=layerwise, device=dev, dtype=dtype, **settings)
