"""Healing a model after layer removal: a short distillation from the original, or SFT, on a data mix.

    >>> info = heal(slim, tok, 50, teacher=original)              # KL to the original's next-token logits
    >>> info = heal(slim, tok, 50, mode="sft", data="general=1")  # plain SFT through moe_slim.recover

``distill`` (the default) trains the slimmed model to match the original: for a decoder, the KL
divergence from the original's next-token distribution to the slimmed model's, on every non-pad
position; for an encoder (no LM head), the mean squared error between the two final hidden states,
scaled by the original's variance. Batches come from :class:`moe_slim.recover.data.MixSampler` over
the built data's ``train`` split (``general`` by default). ``sft`` hands over to
:func:`moe_slim.recover.loop.sft` (full fine-tuning, best validation weights kept).

Only the transformer layers and the final norm train (``trainable="layers"``, the default; the
embeddings and the head stay as they were), which is what removing layers disturbed and keeps the
optimiser state small. Every method healed with the same ``steps``, data and seed is healed equally.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import MoeSlimError
from .family import family_for, final_norm, present_stacks, stack_layers

HEAL_MODES: tuple[str, ...] = ("distill", "sft")
DEFAULT_HEAL_DATA = "general=1"


def _is_causal(model: torch.nn.Module) -> bool:
    return family_for(model).kind == "decoder" and model.get_output_embeddings() is not None


def _trainable(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    if which == "all":
        params = list(model.parameters())
    elif which == "layers":
        mods: list[torch.nn.Module] = [layer for layers in stack_layers(model).values() for layer in layers]
        mods += [n for st in present_stacks(model) if (n := final_norm(model, st)) is not None]
        params = [p for m in mods for p in m.parameters()]
    else:
        raise MoeSlimError(f"unknown trainable set {which!r}; choose layers or all")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in params if p.is_floating_point()]


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor],
                 causal: bool) -> torch.Tensor:
    """KL(teacher || student) per non-pad position (decoders), or variance-scaled MSE of the final hidden
    states (encoders)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    m = mask.bool()
    if causal:  # the one KL loss of the toolkit, shared with MoE recovery (moe_slim.recover.distill)
        from ..recover.distill import kl_to_teacher

        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        return kl_to_teacher(student(input_ids=ids, attention_mask=mask, use_cache=False).logits, t, mask)
    with torch.no_grad():
        t = teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    s = student.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    var = t[m].var(0).mean().clamp_min(1e-6)
    return ((s - t) ** 2)[m].mean() / var


def heal(
    model: torch.nn.Module,
    tokenizer: Any,
    steps: int,
    *,
    teacher: torch.nn.Module | None = None,
    mode: str = "distill",
    data: Any = DEFAULT_HEAL_DATA,
    data_dir: str | os.PathLike | None = None,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 128,
    seed: int = 0,
    trainable: str = "layers",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Heal ``model`` in place for ``steps`` optimizer steps; returns what was done (losses, time, tokens)."""
    say = log or (lambda m: None)
    if mode not in HEAL_MODES:
        raise MoeSlimError(f"unknown heal mode {mode!r}; choose one of {', '.join(HEAL_MODES)}")
    if not isinstance(steps, int) or steps < 1:
        raise MoeSlimError(f"heal steps must be a positive integer, not {steps!r}")
    if family_for(model).kind == "encoder-decoder":
        raise MoeSlimError("healing supports decoders and encoders; this model is an encoder-decoder")
    causal = _is_causal(model)
    t0 = time.perf_counter()
    if mode == "sft":
        if not causal:
            raise MoeSlimError("--heal-mode sft trains next-token prediction and needs a decoder; use distill")
        from ..recover.loop import sft

        res = sft(model, tokenizer, data, steps=steps, mode="full", data_dir=data_dir, lr=lr, batch_size=batch_size,
                  seq_len=seq_len, seed=seed, patience=None, progress=False, log=say)
        return {"mode": "sft", "steps": res.steps, "data": res.data, "lr": lr, "batch_size": batch_size,
                "seq_len": seq_len, "seed": seed, "tokens": res.tokens, "seconds": round(time.perf_counter() - t0, 1),
                "val_loss_before": res.metrics_before.get("val_loss"), "val_loss_after": res.metrics_after.get("val_loss")}
    if teacher is None:
        raise MoeSlimError("distillation needs the original model as teacher (or use mode='sft')")
    from ..recover.data import MixSampler, load_sft_data

    sft_data = load_sft_data(data, data_dir=data_dir, seed=seed)
    sampler = MixSampler(sft_data, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed)
    torch.manual_seed(seed)
    params = _trainable(model, trainable)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    from transformers import get_scheduler

    sched = get_scheduler("cosine", opt, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    teacher.eval()
    was = model.training
    model.train()
    losses, tokens = [], 0
    try:
        for step in range(steps):
            batch = sampler.batch()
            tokens += int(batch["attention_mask"].sum())
            loss = distill_loss(model, teacher, batch, causal)
            if not torch.isfinite(loss):
                raise MoeSlimError(f"heal loss became {float(loss)} at step {step + 1} (lower the learning rate)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if (step + 1) % max(1, steps // 5) == 0:
                say(f"heal step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    finally:
        model.train(was)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    k = max(1, min(5, len(losses) // 4))
    return {"mode": "distill", "objective": "KL to the original's logits" if causal else
            "variance-scaled MSE to the original's final hidden states", "steps": steps, "data": sft_data.spec,
            "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "trainable": trainable,
            "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(sum(losses[:k]) / k, 5), "loss_last": round(sum(losses[-k:]) / k, 5)}
