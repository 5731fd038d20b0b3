"""Distillation from the unpruned model: the KL loss, and where the teacher's next-token distributions
come from.

    >>> loss = kl_to_teacher(student_logits, teacher_logprobs, mask)        # dense teacher
    >>> loss = kl_to_teacher(student_logits, TopK(logprobs, indices), mask)  # cached top-k teacher

The loss is KL(teacher ‖ student) per position, averaged over the positions ``mask`` keeps (every
non-pad token of the student's input). A sparse teacher (its top-k log-probabilities per position,
as :mod:`.teacher_cache` stores them) is compared on the partition {each of its k tokens, everything
else}: the teacher's left-over mass ``1 - Σ top-k`` against the student's mass outside those k
tokens, which is the exact KL between the two coarsened distributions (never more than the full KL,
and equal to it when the teacher puts all its mass in the k tokens).

:class:`ModelTeacher` runs a teacher model in inference mode, one batch at a time, and hands back its
log-probabilities; it holds no optimizer state and builds no autograd graph.
``dense/heal.py`` (ProbScale) uses :func:`kl_to_teacher` too: one KL loss for the whole toolkit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import MoeSlimError
from .data import IGNORE

LOSSES: tuple[str, ...] = ("ce", "kd", "kd+ce")
DEFAULT_TOPK = 64


@dataclass
class TopK:
    """The teacher's ``k`` largest log-probabilities per position and their token ids ([batch, seq, k])."""

    logprobs: torch.Tensor
    indices: torch.Tensor


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise MoeSlimError(f"unknown recovery loss {loss!r} (choose from: {', '.join(LOSSES)})")
    return loss


def kl_to_teacher(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """KL(teacher ‖ student) summed over the vocabulary, then averaged (or summed) over ``mask``'s positions.

    ``teacher``: log-probabilities over the whole vocabulary ([batch, seq, vocab]), or a :class:`TopK`.
    """
    s = torch.log_softmax(student_logits.float(), -1)
    keep = mask.bool()
    if isinstance(teacher, TopK):
        t = teacher.logprobs.float()
        s_top = s.gather(-1, teacher.indices.long())
        p_top = t.exp()
        kl = (p_top * (t - s_top)).sum(-1)
        rest_t = (1.0 - p_top.sum(-1)).clamp_min(0.0)
        rest_s = (1.0 - s_top.exp().sum(-1)).clamp_min(1e-12)
        kl = kl + torch.where(rest_t > 0, rest_t * (torch.log(rest_t.clamp_min(1e-12)) - torch.log(rest_s)),
                              torch.zeros_like(rest_t))
    else:
        kl = nn.functional.kl_div(s, teacher.float(), log_target=True, reduction="none").sum(-1)
    kl = kl[keep]
    return kl.sum() if reduction == "sum" else kl.mean()


def top_k(logprobs: torch.Tensor, k: int) -> TopK:
    """The ``k`` most likely tokens of each position (log-probabilities in float16, ids in int32, for caching)."""
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TopK(values.to(torch.float16), indices.to(torch.int32))


class Teacher(Protocol):
    """Where the teacher's distributions come from: a model run on the fly, or a cache read from disk."""

    def targets(self, batch: Mapping[str, torch.Tensor], key: Any = None) -> torch.Tensor | TopK: ...

    def describe(self) -> dict[str, Any]: ...


class ModelTeacher:
    """A teacher model in inference mode: its log-probabilities for one batch at a time (or their top-k)."""

    def __init__(self, model: nn.Module, k: int | None = None) -> None:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise MoeSlimError("distillation is for decoder-only models; this teacher is an encoder-decoder")
        self.model = model.eval()  # inference mode below: no gradient, no optimizer state, flags left as they are
        self.k = k

    def describe(self) -> dict[str, Any]:
        from ..fingerprint import model_fingerprint

        return {"kind": "model, on the fly", "fingerprint": model_fingerprint(self.model),
                "name_or_path": str(getattr(self.model.config, "_name_or_path", "") or ""), "topk": self.k}

    def targets(self, batch: Mapping[str, torch.Tensor], key: Any = None) -> torch.Tensor | TopK:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                use_cache=False).logits
            out = torch.log_softmax(logits.float(), -1)
            out = top_k(out, self.k) if self.k else out
        if isinstance(out, TopK):  # inference tensors cannot be saved for the student's backward: plain copies
            return TopK(out.logprobs.clone().to(batch["input_ids"].device), out.indices.clone().to(batch["input_ids"].device))
        return out.clone().to(batch["input_ids"].device)


def objective(model: nn.Module, batch: Mapping[str, torch.Tensor], loss: str, teacher: Teacher | None,
              kd_weight: float, key: Any = None, reduction: str = "mean") -> torch.Tensor:
    """The training loss of one batch: ``ce`` (target tokens), ``kd`` (KL to the teacher on every non-pad
    position) or ``kd+ce`` (``kd_weight`` · KL + (1 − ``kd_weight``) · CE)."""
    from .loss import batch_loss, masked_lm_loss

    if loss == "ce":
        return batch_loss(model, batch, reduction)
    if teacher is None:
        raise MoeSlimError(f"loss {loss} needs a teacher (the unpruned model)")
    if "dec_labels" in batch:
        raise MoeSlimError("distillation is for decoder-only models; this one is an encoder-decoder")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    kd = kl_to_teacher(out.logits, teacher.targets(batch, key), batch["attention_mask"], reduction)
    if loss == "kd":
        return kd
    return kd_weight * kd + (1.0 - kd_weight) * masked_lm_loss(out.logits, batch["labels"], reduction)


@torch.no_grad()
def validation_objective(model: nn.Module, batches: list[dict[str, torch.Tensor]], loss: str,
                         teacher: Teacher | None, kd_weight: float, device: Any = None) -> dict[str, float]:
    """Per-token means over fixed validation batches: ``val_loss`` (CE on target tokens) and, with a
    teacher, ``val_kd`` (KL per non-pad position) and ``val_objective`` (what early stopping watches)."""
    from .loss import batch_loss

    was = model.training
    model.eval()
    ce, n_ce, kd, n_kd = 0.0, 0, 0.0, 0
    try:
        for i, b in enumerate(batches):
            if device is not None:
                b = {k: v.to(device) for k, v in b.items()}
            if "dec_labels" in b:
                n_ce += int((b["dec_labels"] != IGNORE).sum())
            else:
                n_ce += int((b["labels"][:, 1:] != IGNORE).sum())
            ce += float(batch_loss(model, b, "sum"))
            if loss != "ce" and teacher is not None:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                kd += float(kl_to_teacher(out.logits, teacher.targets(b, ("val", i)), b["attention_mask"], "sum"))
                n_kd += int(b["attention_mask"].sum())
    finally:
        model.train(was)
    res = {"val_loss": ce / max(n_ce, 1)}
    if loss == "ce" or teacher is None:
        res["val_objective"] = res["val_loss"]
        return res
    res["val_kd"] = kd / max(n_kd, 1)
    res["val_objective"] = res["val_kd"] if loss == "kd" else kd_weight * res["val_kd"] + (1 - kd_weight) * res["val_loss"]
    return res
