"""Calibration text as token batches (packed rows, or one text per row with padding), and one
no-grad forward that tells the recorder which tokens are padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: the recorder imports nothing from here
    from .recorder import Recorder


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def make_batches(
    tokenizer: Any, texts: list[str], *, seq_len: int, batch_size: int, max_tokens: int | None, pack: bool
) -> list[Batch]:
    """Token batches for one domain: packed into full rows, or one text per row with a mask.

    At most ``max_tokens`` real (non-padding) tokens are produced.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list[int]] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    if pack:
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        for text in texts:
            if len(stream) >= budget:
                break
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        stream = stream[: int(min(budget, len(stream)))]
        rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    else:
        used = 0
        for text in texts:
            if used >= budget:
                break
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:seq_len]
            ids = ids[: int(min(len(ids), budget - used))]
            if ids:
                rows.append(ids)
                used += len(ids)
    return [Batch(*pad_rows(rows[i : i + batch_size], pad_id)) for i in range(0, len(rows), batch_size)]


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: ``(input_ids, attention_mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return ids, mask


def calibration_batches(tokenizer: Any, calibration: dict[str, list[str]], *, seq_len: int, batch_size: int,
                        max_tokens: int | dict[str, int] | None, pack: bool) -> dict[str, list[Batch]]:
    """Batches of every domain; one-line errors for impossible settings or a domain without text."""
    from ..errors import MoeSlimError

    if not calibration:
        raise MoeSlimError("no calibration text was given")
    if seq_len < 1 or batch_size < 1:
        raise MoeSlimError(f"--seq-len and --batch-size must be positive (got {seq_len} and {batch_size})")
    batches = {}
    for domain, texts in calibration.items():
        cap = max_tokens.get(domain) if isinstance(max_tokens, dict) else max_tokens
        batches[domain] = make_batches(tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=cap,
                                       pack=pack)
        if not batches[domain]:
            raise MoeSlimError(f"calibration domain '{domain}' has no text (give a non-empty file)")
    return batches


def stream_offsets(batches: list[Batch]) -> list[int]:
    """Where each batch's first real token sits in its domain's stream (padding excluded)."""
    offsets, total = [], 0
    for b in batches:
        offsets.append(total)
        total += int(b.attention_mask.sum())
    return offsets


def _input_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def run_batch(model: nn.Module, batch: Batch, recorder: Recorder | None = None) -> None:
    """One no-grad forward, with the padding masks published to the recorder."""
    device = _input_device(model)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    if recorder is not None:
        flat = mask.reshape(-1).bool()
        recorder.masks = {"decoder": flat, "encoder": flat}
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
    else:
        kwargs["use_cache"] = False
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # observation reads the routers, not the logits of every token
    model(**kwargs)
