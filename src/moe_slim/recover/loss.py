"""The SFT loss: mean cross-entropy over target tokens (labels -100 elsewhere), for decoders and
encoder-decoders (the validation objective lives in :mod:`.distill`, beside the KD loss).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import MoeSlimError
from .data import IGNORE, collate

# --------------------------------------------------------------------------------------- loss


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not -100 (``sum`` or ``mean``)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                       ignore_index=IGNORE, reduction=reduction)


def _is_encdec(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """The SFT loss of one batch (decoder-only: masked next-token loss; encoder-decoder: the
    prompt goes to the encoder and the target is the decoder's labels)."""
    if "dec_labels" in batch:
        out = model(input_ids=batch["enc_ids"], attention_mask=batch["enc_mask"], labels=batch["dec_labels"])
        if reduction == "sum":
            return out.loss * (batch["dec_labels"] != IGNORE).sum()
        return out.loss
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return masked_lm_loss(out.logits, batch["labels"], reduction)


def _to_encdec(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Split a decoder-only batch into encoder prompt and decoder target (prompt/target records)."""
    ids, labels = batch["input_ids"], batch["labels"]
    enc, dec = [], []
    for i in range(ids.shape[0]):
        n = int(batch["attention_mask"][i].sum())
        lab = labels[i, :n]
        k = int((lab == IGNORE).sum())
        if k == 0:
            raise MoeSlimError("encoder-decoder SFT needs prompt/target records (text-only data has no source side)")
        enc.append(ids[i, :k].tolist())
        dec.append(lab[k:].tolist())
    e = collate([(x, x) for x in enc], pad_id)
    d = collate([(x, x) for x in dec], pad_id)
    return {"enc_ids": e["input_ids"], "enc_mask": e["attention_mask"], "dec_labels": d["labels"]}
