"""Short supervised fine-tuning that heals a pruned or merged MoE (``moe-slim sft``).

    >>> result = sft(model, tok, "translation=0.8,general=0.2", steps=200, mode="experts", data_dir=None)
    >>> result.metrics_before["val_loss"], result.metrics_after["val_loss"]

Data is a mix spec over the built data's ``train`` split (the target domain plus optional general
replay), or records given directly. Records with ``prompt``/``target`` (translation, math) are
trained on the target tokens only: labels are -100 on the prompt and on padding. Records with only
``text`` (general, code) are trained on every token of one window of ``seq_len`` tokens.

Modes (what is trained):

* ``full``: every parameter.
* ``experts``: only the MoE experts and routers (and shared experts) of every MoE block, found
  through the family table (:func:`moe_slim.families.moe_layers`); attention, norms and
  embeddings stay frozen, so it works the same for every family.
* ``router``: only the routers (weights and biases).
* ``lora``: LoRA adapters (``peft``) on every ``nn.Linear`` except the output head and the
  routers: the attention projections, dense MLPs, shared experts and module-layout experts
  (Switch / NLLB-MoE). Fused 3-D experts (Qwen3-MoE, Mixtral, ...) are not ``nn.Linear`` and get
  no adapter unless ``lora_experts=True`` (``--lora-experts``), which adds a per-expert low-rank
  update to their 3-D weights through peft's ``target_parameters``. ``lora_targets`` overrides the
  linears chosen.

The loop uses :class:`accelerate.Accelerator` for device placement and gradient accumulation and
``transformers.get_scheduler`` for warm-up and decay. ``steps`` counts optimizer steps (each
``grad_accum`` micro-batches). Every ``eval_every`` steps the run's objective (CE, KL to the teacher,
or their blend: see ``loss``) is measured on a fixed slice of the ``validation`` split; training
stops after ``patience`` evaluations without improvement, and the best weights seen (the weights
before training included) are restored, so SFT never ends worse on that objective than it started.

The model's structure and config are never changed: a pruned model keeps its experts per layer.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from .data import MixSampler, _pad_id, load_sft_data, validation_batches
from .distill import ModelTeacher, Teacher, check_loss, objective, validation_objective
from .loss import _is_encdec, _to_encdec
from .modes import (
    DEFAULT_LR,
    check_mode,
    lora_expert_parameters,
    lora_target_modules,
    set_trainable,
)

SCHEDULERS: tuple[str, ...] = ("cosine", "linear", "constant_with_warmup")


# --------------------------------------------------------------------------------------- result


@dataclass
class SftResult:
    """What an SFT run did. ``model`` is the trained model (a ``peft`` model for an unmerged LoRA run)."""

    model: Any = field(repr=False)
    mode: str
    data: str
    steps: int  # optimizer steps run
    max_steps: int
    best_step: int
    stopped_early: bool
    tokens: int
    seconds: float
    trainable_params: int
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    lora: dict[str, Any] | None = None
    merged: bool = False
    loss: str = "ce"
    teacher: dict[str, Any] | None = None  # what the student distilled from (kind, fingerprint, top-k)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({k: v for k, v in self.__dict__.items() if k != "model"}, default=str))

    def metrics(self, prefix: str = "sft/") -> dict[str, float]:
        """Flat numbers for sweeps and reports."""
        out = {f"{prefix}steps": float(self.steps), f"{prefix}best_step": float(self.best_step),
               f"{prefix}tokens": float(self.tokens), f"{prefix}minutes": round(self.seconds / 60, 3),
               f"{prefix}trainable_params": float(self.trainable_params)}
        for k, v in self.metrics_before.items():
            out[f"{prefix}{k}_before"] = v
        for k, v in self.metrics_after.items():
            out[f"{prefix}{k}_after"] = v
        return out


def _chrf(model: nn.Module, tok: Any, data_dir: Any, limit: int,
          before: dict[str, Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """chrF on the test split with its n; given the results before SFT, also the paired-bootstrap difference
    (after - before, 95% interval) on the same sentences. Returns the figures and the whole results."""
    from ..evals.run import evaluate

    res = evaluate(model, tok, "quick", data_dir=data_dir, tasks=["translation"], limit=limit,
                   bootstrap_samples=0 if before is None else 1000, baseline=before, hash_weights=False)
    m = res["metrics"]
    out = {"chrf": float(m["translation/chrf"]), "chrf_n": float(m["translation/n"])}
    if before is not None:
        out.update(chrf_delta=float(m["translation/chrf_delta_vs_baseline"]),
                   chrf_delta_lo=float(m["translation/chrf_delta_lo"]), chrf_delta_hi=float(m["translation/chrf_delta_hi"]))
    return out, res


def sft(
    model: nn.Module,
    tok: Any,
    data: Any,
    *,
    steps: int,
    mode: str = "experts",
    data_dir: str | os.PathLike | None = None,
    val_data: Any = None,
    lr: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    seq_len: int = 256,
    warmup: int | float = 0.1,
    scheduler: str = "cosine",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    eval_every: int | None = None,
    val_examples: int = 64,
    patience: int | None = 3,
    seed: int = 0,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] | None = None,
    lora_experts: bool = False,
    merge_lora: bool = False,
    chrf_limit: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    cpu: bool = False,
    loss: str = "ce",
    teacher: nn.Module | Teacher | None = None,
    kd_weight: float = 0.5,
) -> SftResult:
    """Fine-tune ``model`` in place for at most ``steps`` optimizer steps and return an :class:`SftResult`.

    ``data``: a mix spec over ``data_dir``'s train split or records (see :func:`load_sft_data`).
    ``warmup``: steps, or a fraction of ``steps`` when < 1. ``eval_every``: validation interval in
    steps (default ``max(1, steps // 10)``); ``patience``: evaluations without improvement before
    stopping (None: never stop early). ``chrf_limit``: also measure chrF (sentences per pair) before
    and after when translation test data is in ``data_dir`` and the data has a translation domain.
    ``merge_lora``: fold LoRA weights into the model (``result.model`` is then a plain model).
    ``max_minutes``: also stop (after a final validation) once training has run this long.
    ``loss``: ``ce`` (cross-entropy on the references' target tokens), ``kd`` (KL to ``teacher``, the
    unpruned model or a :class:`~moe_slim.recover.distill.Teacher` such as a top-k cache, on every
    non-pad position) or ``kd+ce`` (``kd_weight`` · KL + (1 − ``kd_weight``) · CE). Early stopping
    watches the same objective on the validation batches.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    say = log or (lambda msg: None)
    mode = check_mode(mode)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise MoeSlimError(f"--steps must be a positive integer (got {steps!r})")
    for name, v in (("batch size", batch_size), ("gradient accumulation", grad_accum), ("seq_len", seq_len)):
        if not isinstance(v, int) or v <= 0:
            raise MoeSlimError(f"{name} must be a positive integer (got {v!r})")
    if seq_len < 2:
        raise MoeSlimError("seq_len must be at least 2")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise MoeSlimError(f"learning rate must be positive (got {lr})")
    if scheduler not in SCHEDULERS:
        raise MoeSlimError(f"unknown scheduler {scheduler!r} (choose from: {', '.join(SCHEDULERS)})")
    if eval_every is not None and eval_every <= 0:
        raise MoeSlimError(f"eval interval must be positive (got {eval_every})")
    if max_minutes is not None and not max_minutes > 0:
        raise MoeSlimError(f"max_minutes must be positive (got {max_minutes})")
    if patience is not None and patience <= 0:
        raise MoeSlimError(f"patience must be positive (got {patience}; leave it unset to never stop early)")
    loss = check_loss(loss)
    if loss != "ce" and teacher is None:
        raise MoeSlimError(f"loss {loss} distils from a teacher: give the unpruned model (--teacher)")
    if not 0.0 <= kd_weight <= 1.0:
        raise MoeSlimError(f"kd_weight must lie in [0, 1] (got {kd_weight})")
    if isinstance(teacher, nn.Module):
        teacher = ModelTeacher(teacher)
    if loss == "ce":
        teacher = None
    if tok is None:
        raise MoeSlimError("SFT needs a tokenizer and this model has none (save one with the checkpoint)")
    if mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise MoeSlimError("LoRA mode needs the peft package (pip install peft)") from None
    data_dir = data_dir_or_default(data_dir)
    sft_data = load_sft_data(data, data_dir=data_dir, val_data=val_data, seed=seed)
    lr = float(lr if lr is not None else DEFAULT_LR[mode])
    warm = int(round(warmup * steps)) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    eval_every = eval_every or max(1, steps // 10)

    set_seed(seed)
    val_batches = validation_batches(sft_data, tok, examples=val_examples, batch_size=batch_size, seq_len=seq_len)
    want_chrf = (chrf_limit is not None and "translation" in sft_data.weights
                 and (Path(data_dir) / "translation" / "test.jsonl").is_file())

    before: dict[str, float] = {}
    if want_chrf:
        say(f"chrF before SFT ({chrf_limit} sentences per pair)")
        chrf_before, chrf_results = _chrf(model, tok, data_dir, chrf_limit)
        before.update(chrf_before)

    lora_info = None
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(lora_targets) if lora_targets else lora_target_modules(model)
        expert_params = lora_expert_parameters(model) if lora_experts else []
        if expert_params and lora_dropout:
            raise MoeSlimError("LoRA on fused experts (--lora-experts) does not support dropout (set --lora-dropout 0)")
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                         target_parameters=expert_params or None, bias="none")
        model = get_peft_model(model, cfg)
        lora_info = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": targets,
                     "expert_parameters": expert_params}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        trainable = set_trainable(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MoeSlimError(f"nothing to train in mode {mode}")

    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=cpu)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=warm, num_training_steps=steps)
    model, optimizer, sched = accelerator.prepare(model, optimizer, sched)
    device = accelerator.device
    encdec = _is_encdec(model)
    pad_id = _pad_id(tok)
    if encdec:
        if loss != "ce":
            raise MoeSlimError("distillation (--loss kd) is for decoder-only models; this one is an encoder-decoder")
        val_batches = [_to_encdec(b, pad_id) for b in val_batches]

    def validate() -> dict[str, float]:
        return validation_objective(model, val_batches, loss, teacher, kd_weight, device)

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    history: list[dict[str, Any]] = []
    best_val = validate() if val_batches else {"val_loss": float("nan"), "val_objective": float("nan")}
    best_loss = best_val["val_objective"]
    before.update({k: v for k, v in best_val.items() if k != "val_objective"})
    best_state, best_step, bad = (snapshot() if val_batches else None), 0, 0
    history.append({"step": 0, **best_val})
    say(f"SFT {mode} ({loss}): {trainable:,} trainable parameters, {steps} steps x {grad_accum} x {batch_size}, "
        f"lr {lr:g}, data {sft_data.spec}; validation {loss} {best_loss:.4f}")

    sampler = MixSampler(sft_data, tok, batch_size=batch_size, seq_len=seq_len, seed=seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"sft {mode}", disable=not progress, dynamic_ncols=True)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    step, stopped, run_loss = 0, False, None
    try:
        while step < steps:
            micro_losses = []
            for micro in range(grad_accum):
                batch = sampler.batch()
                tokens += int(batch["attention_mask"].sum())
                if encdec:
                    batch = _to_encdec(batch, pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    value = objective(model, batch, loss, teacher, kd_weight, key=(step, micro))
                    accelerator.backward(value)
                    if accelerator.sync_gradients and max_grad_norm:
                        accelerator.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    sched.step()
                    optimizer.zero_grad()
                micro_losses.append(float(value.detach()))
            step += 1
            train_loss = sum(micro_losses) / len(micro_losses)
            if not math.isfinite(train_loss):
                raise MoeSlimError(f"training loss became {train_loss} at step {step} (lower the learning rate)")
            run_loss = train_loss if run_loss is None else 0.9 * run_loss + 0.1 * train_loss
            entry: dict[str, Any] = {"step": step, "train_loss": round(train_loss, 5), "lr": sched.get_last_lr()[0]}
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{run_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            out_of_time = max_minutes is not None and elapsed >= 60 * max_minutes
            if out_of_time and step < steps:
                entry["time_limit"] = True
                say(f"time limit of {max_minutes:g} min reached at step {step}")
            if val_batches and (step % eval_every == 0 or step == steps or out_of_time):
                val = validate()
                vl = val["val_objective"]
                entry.update(val)
                if vl < best_loss:
                    best_loss, best_val, best_state, best_step, bad = vl, val, snapshot(), step, 0
                else:
                    bad += 1
                bar.set_postfix(loss=f"{run_loss:.3f}", val=f"{vl:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
                if patience is not None and bad >= patience and step < steps:
                    stopped = True
                    entry["early_stop"] = True
                    history.append(entry)
                    say(f"early stop at step {step}: no validation improvement in {patience} evaluations")
                    break
            history.append(entry)
            if out_of_time:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    model = accelerator.unwrap_model(model)
    model.eval()
    if best_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n].to(p.device))
    else:
        best_step = step
    if mode != "lora":
        for p in model.parameters():
            p.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    if device.type != "cpu":  # drops the GPU cache; on CPUs it is only a full gc.collect (0.4 s, 90% of a short run)
        accelerator.free_memory()

    merged = False
    if mode == "lora" and merge_lora:
        model = model.merge_and_unload()
        merged = True
    after: dict[str, float] = {}
    if want_chrf:
        say(f"chrF after SFT ({chrf_limit} sentences per pair)")
        after.update(_chrf(model, tok, data_dir, chrf_limit, before=chrf_results)[0])
    after.update({k: v for k, v in best_val.items() if k != "val_objective"})
    settings = {"lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len, "warmup": warm,
                "scheduler": scheduler, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
                "eval_every": eval_every, "val_examples": val_examples, "patience": patience, "seed": seed,
                "chrf_limit": chrf_limit, "max_minutes": max_minutes, "weights": sft_data.weights, "device": str(device),
                "loss": loss, **({"kd_weight": kd_weight} if loss == "kd+ce" else {})}
    say(f"SFT done: {step} steps in {seconds / 60:.1f} min, best validation {loss} {best_loss:.4f} at step {best_step}")
    return SftResult(model=model, mode=mode, data=sft_data.spec, steps=step, max_steps=steps, best_step=best_step,
                     stopped_early=stopped, tokens=tokens, seconds=round(seconds, 2), trainable_params=trainable,
                     settings=settings, history=history, metrics_before=before, metrics_after=after,
                     lora=lora_info, merged=merged, loss=loss, teacher=teacher.describe() if teacher else None)
