"""Batched greedy generation with a KV cache, for evaluation.

Decoder-only models run through our own loop: prompts are sorted by length, left-padded into
batches, prefilled once, then decoded one token per step against the cache; a row leaves the batch
as soon as it emits an end-of-sequence token, one of the stop strings, or reaches its token budget,
so short answers do not pay for long ones. Encoder-decoder models go through ``model.generate``.

Greedy decoding is causal, so stopping a row early never changes the text before the stop: the
output equals what one-prompt-at-a-time ``model.generate`` produces, cut at the first stop string.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..errors import MoeSlimError
from ..modeling.kv import cache_kwarg, returned_cache
from ..prompts import END_TAG

#: Where a translation (or any one-line answer) ends.
DEFAULT_STOP_STRINGS: tuple[str, ...] = (END_TAG, "\n")


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a sequence: the tokenizer's EOS and the model's generation config."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def pad_token_id(model: Any, tokenizer: Any) -> int:
    """A token id to fill padding with (its value never matters: padding is masked)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def cut_at_stops(text: str, stop_strings: Sequence[str], stop_regex: re.Pattern[str] | None = None
                 ) -> tuple[str, bool]:
    """``text`` up to the first stop string (or through the first ``stop_regex`` match), and whether one was found."""
    cut = len(text)
    for stop in stop_strings:
        pos = text.find(stop)
        if 0 <= pos < cut:
            cut = pos
    if stop_regex is not None:
        m = stop_regex.search(text)
        if m is not None and m.end() < cut:
            cut = m.end()
    return text[:cut], cut < len(text)


class Stops(NamedTuple):
    strings: tuple[str, ...]
    regex: re.Pattern[str] | None

    def cut(self, text: str) -> tuple[str, bool]:
        return cut_at_stops(text, self.strings, self.regex)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt (no padding, no truncation)."""
    if tokenizer is None:
        raise MoeSlimError("this model has no tokenizer; evaluation needs one (save it with the checkpoint)")
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    for i, row in enumerate(ids):
        if not row:
            raise MoeSlimError(f"prompt {i} encodes to no tokens; every prompt needs at least one token")
    return ids


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int] = 64,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    stop_regex: re.Pattern[str] | None = None,
    batch_size: int = 32,
    add_special_tokens: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut before its first stop string or EOS.

    ``stop_regex`` also ends a continuation, which then keeps the text through the match.

    ``max_new_tokens`` is one budget for all prompts or one per prompt. Prompts are batched in order
    of length (longest first) and the outputs returned in the caller's order. ``progress`` is called
    with the number of prompts finished after each batch.
    """
    n = len(prompts)
    if n == 0:
        return []
    budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
    if len(budgets) != n:
        raise MoeSlimError(f"got {len(budgets)} token budgets for {n} prompts; give one per prompt or one int")
    if batch_size < 1:
        raise MoeSlimError(f"batch size must be at least 1, not {batch_size}")
    if min(budgets) < 1:
        raise MoeSlimError(f"max_new_tokens must be at least 1, not {min(budgets)}")
    stops = Stops(tuple(stop_strings), stop_regex)
    ids = encode_prompts(tokenizer, prompts, add_special_tokens)
    order = sorted(range(n), key=lambda i: (-len(ids[i]), -budgets[i], i))
    outputs: list[str] = [""] * n
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    run = _generate_encoder_decoder if encoder_decoder else _generate_decoder_only
    for start in range(0, n, batch_size):
        chunk = order[start:start + batch_size]
        texts = run(model, tokenizer, [ids[i] for i in chunk], [budgets[i] for i in chunk], stops)
        for i, text in zip(chunk, texts):
            outputs[i] = text
        if progress is not None:
            progress(len(chunk))
    return outputs


def _model_device(model: Any) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return next(model.parameters()).device


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@torch.inference_mode()
def _generate_decoder_only(model: Any, tokenizer: Any, batch: list[list[int]], budgets: list[int],
                           stops: Stops) -> list[str]:
    device = _model_device(model)
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(model, tokenizer)
    width = max(len(row) for row in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        input_ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    forward = model.forward
    extra: dict[str, Any] = {}
    if _accepts(forward, "logits_to_keep"):
        extra["logits_to_keep"] = 1
    use_positions = _accepts(forward, "position_ids")
    cache_arg = cache_kwarg(model)

    generated: list[list[int]] = [[] for _ in batch]
    texts: list[str | None] = [None] * len(batch)
    active = list(range(len(batch)))  # rows of the original batch still running, in cache order
    cache = None
    step_ids, step_pos = input_ids, positions
    can_shrink = True
    for step in range(max(budgets) if budgets else 0):
        kwargs = dict(extra)
        if use_positions:
            kwargs["position_ids"] = step_pos
        out = model(input_ids=step_ids, attention_mask=mask, use_cache=True, **{cache_arg: cache}, **kwargs)
        cache = returned_cache(out)
        next_tokens = out.logits[:, -1, :].argmax(dim=-1).tolist()
        keep: list[int] = []  # positions (in the current batch) of rows that continue
        for pos, (row, tok) in enumerate(zip(active, next_tokens)):
            if texts[row] is not None:  # finished earlier but kept because the cache cannot shrink
                continue
            if tok in eos:
                texts[row] = stops.cut(_decode(tokenizer, generated[row]))[0]
                continue
            generated[row].append(tok)
            text, stopped = stops.cut(_decode(tokenizer, generated[row]))
            if stopped or len(generated[row]) >= budgets[row]:
                texts[row] = text
                continue
            keep.append(pos)
        if not keep:
            break
        last_tokens = torch.tensor([[next_tokens[p]] for p in range(len(active))], dtype=torch.long, device=device)
        next_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        if can_shrink and len(keep) < len(active):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            try:
                cache.batch_select_indices(idx)
            except (AttributeError, NotImplementedError, TypeError):
                can_shrink = False  # an unusual cache: keep finished rows and ignore what they produce
            else:
                active = [active[p] for p in keep]
                last_tokens, next_pos, mask = last_tokens[idx], next_pos[idx], mask[idx]
        step_ids, step_pos = last_tokens, next_pos
    return [t if t is not None else stops.cut(_decode(tokenizer, g))[0] for t, g in zip(texts, generated)]


@torch.inference_mode()
def _generate_encoder_decoder(model: Any, tokenizer: Any, batch: list[list[int]], budgets: list[int],
                              stops: Stops) -> list[str]:
    device = _model_device(model)
    pad = pad_token_id(model, tokenizer)
    width = max(len(row) for row in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        input_ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, :len(row)] = 1
    eos = sorted(eos_token_ids(model, tokenizer))
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(budgets),
        do_sample=False, num_beams=1, eos_token_id=eos or None, pad_token_id=pad,
        temperature=None, top_p=None, top_k=None,
    )
    start = getattr(model.config, "decoder_start_token_id", None)
    texts = []
    for r, row in enumerate(out.tolist()):
        if row and start is not None and row[0] == start:
            row = row[1:]
        kept: list[int] = []
        for tok in row[: budgets[r]]:
            if tok in eos:
                break
            kept.append(tok)
        texts.append(stops.cut(_decode(tokenizer, kept))[0])
    return texts
