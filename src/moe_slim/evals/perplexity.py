"""Perplexity per domain, token-weighted.

Each document is tokenized whole (with the tokenizer's special tokens, e.g. a BOS) and cut into
consecutive windows of at most ``seq_len`` tokens; every token of a window except its first is
predicted from the tokens before it in that window. The reported number is
``exp(sum of NLL over all predicted tokens / number of predicted tokens)`` per domain and over all
domains together. Windows are batched by length with right padding; padded positions are masked
out of attention and out of the sums, so batching never changes the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import MoeSlimError
from .generation import _model_device, pad_token_id


def windows_of(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Consecutive windows of at most ``seq_len`` tokens, dropping a last window of one token (nothing to predict)."""
    out = [list(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return [w for w in out if len(w) >= 2]


@torch.inference_mode()
def windows_nll(model: Any, windows: Sequence[Sequence[int]], *, batch_size: int = 8, pad_id: int = 0,
                progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Sum of next-token NLL (nats) over every predicted token of ``windows``, and the number of those tokens."""
    device = _model_device(model)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [windows[i] for i in order[start:start + batch_size]]
        width = max(len(w) for w in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, :len(w)] = torch.tensor(list(w), dtype=torch.long)
            mask[r, :len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1, :].float()
        targets = ids[:, 1:]
        keep = mask[:, 1:].bool()
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        del logits
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
        if progress is not None:
            progress(len(batch))
    return total, count


def _summary(nll: float, tokens: int) -> dict[str, Any]:
    per_token = nll / tokens if tokens else float("nan")
    return {"tokens": tokens, "nll_sum": nll, "nll_per_token": per_token,
            "ppl": math.exp(per_token) if tokens else float("nan")}


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    docs: Mapping[str, Sequence[str]],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Token-weighted perplexity of each domain's documents (``{domain: [text, ...]}``) and overall."""
    if seq_len < 2:
        raise MoeSlimError(f"sequence length must be at least 2 tokens, not {seq_len}")
    if getattr(model.config, "is_encoder_decoder", False):
        return {"skipped": "perplexity is measured on decoder-only models; this one is encoder-decoder"}
    if tokenizer is None:
        raise MoeSlimError("this model has no tokenizer; perplexity needs one (save it with the checkpoint)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        seq_len = max_pos
    pad = pad_token_id(model, tokenizer)
    out: dict[str, Any] = {"seq_len": seq_len, "domains": {}}
    all_nll, all_tokens = 0.0, 0
    for domain, texts in docs.items():
        texts = [t for t in texts if t]
        encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"] if texts else []
        windows = [w for ids in encoded for w in windows_of(ids, seq_len)]
        nll, tokens = windows_nll(model, windows, batch_size=batch_size, pad_id=pad, progress=progress)
        out["domains"][domain] = {"docs": len(texts), "windows": len(windows), **_summary(nll, tokens)}
        all_nll += nll
        all_tokens += tokens
    out["overall"] = _summary(all_nll, all_tokens)
    return out
