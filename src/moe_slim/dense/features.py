"""Pooled hidden states of every layer, and ShortGPT's Block Influence, in one pass over the texts.

For each stack, ``h_0`` is the embedding output (the input of the first layer) and ``h_l`` the
output of layer ``l`` (1-based: row ``l`` of the feature array is the output of layer index
``l - 1``). Before pooling, every ``h_l`` goes through the stack's final norm (the family table
names it), so row ``l`` is exactly what a model truncated after layer ``l`` would hand to its head;
pooling is the mean over non-pad tokens, the last non-pad token (what a decoder's sequence
classifier reads), or the first non-pad token (an encoder's [CLS], what BERT's classifier reads).

Block Influence (Men et al., 2024, "ShortGPT") of layer ``l`` is ``1 - cos(h_{l-1}, h_l)``
averaged over all non-pad tokens, on the raw (un-normed) residual stream. The angular distance of
Gromov et al. (2024), ``arccos(cos(h_i, h_j)) / pi`` for every pair of rows, is averaged the same way
(over all non-pad tokens rather than the last one only, which is less noisy on short texts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import MoeSlimError
from .family import Stack, family_for, final_norm, layer_list, present_stacks

POOLINGS = ("mean", "last", "first")
SMALL_HIDDEN = 128


def _hidden_size(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or 1 << 30)


@dataclass
class Features:
    """Per stack: ``pooled[name]`` is ``[n_layers + 1, n_texts, hidden]`` (or ``[1, ...]`` final-only)."""

    pooled: dict[str, np.ndarray]
    block_influence: dict[str, np.ndarray] = field(default_factory=dict)
    n_tokens: int = 0
    pooling: str = "mean"
    angular: dict[str, np.ndarray] = field(default_factory=dict)  # [L+1, L+1] mean angular distance of rows

    def final(self, stack: str | None = None) -> np.ndarray:
        """The pooled final representation (after the last layer) of a stack (default: the last one)."""
        name = stack or list(self.pooled)[-1]
        return self.pooled[name][-1]


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _pool(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    pos = torch.arange(mask.shape[1], device=mask.device)
    if pooling == "first":  # the first non-pad position, whichever side the padding is on
        at = torch.where(mask.bool(), pos, mask.shape[1]).argmin(1)
    else:
        at = (mask.long() * pos).argmax(1)
    return h[torch.arange(h.shape[0], device=h.device), at]


def _decoder_inputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced decoder inputs for an encoder-decoder: the text itself, shifted right."""
    start = getattr(model.config, "decoder_start_token_id", None)
    pad = getattr(model.config, "pad_token_id", None) or 0
    if start is None:
        start = pad
    dec = torch.full_like(ids, pad)
    dec[:, 1:] = ids[:, :-1]
    dec[:, 0] = start
    dmask = torch.ones_like(mask)
    dmask[:, 1:] = mask[:, :-1]
    return dec, dmask


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    pooling: str = "mean",
    max_length: int = 128,
    batch_size: int = 16,
    final_only: bool = False,
) -> Features:
    """Pooled (final-normed) hidden states of every layer of every stack, plus Block Influence."""
    if pooling not in POOLINGS:
        raise MoeSlimError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if tokenizer is None:
        raise MoeSlimError("the model ships no tokenizer; probing needs one (save it next to the checkpoint)")
    if not texts:
        raise MoeSlimError("no texts to probe")
    fam = family_for(model)
    stacks: list[Stack] = present_stacks(model)
    device = next(model.parameters()).device
    order = np.argsort([-len(t) for t in texts], kind="stable")

    captured: dict[str, list[torch.Tensor | None]] = {}
    handles = []
    for st in stacks:
        layers = layer_list(model, st)
        captured[st.name] = [None] * (len(layers) + 1)

        def pre_hook(mod, args, kwargs, name=st.name):
            h = args[0] if args else kwargs.get("hidden_states")
            captured[name][0] = _hidden(h)

        handles.append(layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i, layer in enumerate(layers):
            if final_only and i != len(layers) - 1:
                continue

            def hook(mod, args, out, name=st.name, slot=i + 1):
                captured[name][slot] = _hidden(out)

            handles.append(layer.register_forward_hook(hook))

    pooled: dict[str, list[list[np.ndarray]]] = {st.name: [] for st in stacks}
    bi_sum = {st.name: np.zeros(len(captured[st.name]) - 1) for st in stacks}
    bi_count = {st.name: 0.0 for st in stacks}
    ang_sum = {st.name: np.zeros((len(captured[st.name]),) * 2) for st in stacks}
    n_tokens = 0
    old_side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    old_threads = torch.get_num_threads()
    if _hidden_size(model) <= SMALL_HIDDEN:
        torch.set_num_threads(1)  # threads only add overhead (often 10x) on tiny matrices
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            n_tokens += int(mask.sum())
            for v in captured.values():
                for j in range(len(v)):
                    v[j] = None
            masks = {st.name: mask for st in stacks}
            if fam.kind == "encoder-decoder" and len(stacks) > 1:
                dec, dmask = _decoder_inputs(model, ids, mask)
                masks["decoder"] = dmask
                model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask,
                      use_cache=False)
            elif fam.kind == "decoder":
                model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                model.base_model(input_ids=ids, attention_mask=mask)
            for st in stacks:
                hs = captured[st.name]
                m = masks[st.name]
                norm = final_norm(model, st)
                rows = []
                for j in [len(hs) - 1] if final_only else range(len(hs)):
                    h = hs[j]
                    if h is None:
                        raise MoeSlimError(f"layer {j - 1} of stack {st.name} produced no output; "
                                           "is the model's layer loop the usual one?")
                    x = norm(h) if norm is not None else h
                    rows.append(_pool(x.float(), m, pooling).cpu().numpy())
                pooled[st.name].append(rows)
                if not final_only:
                    fm = m.float()
                    for j in range(1, len(hs)):
                        cos = torch.nn.functional.cosine_similarity(hs[j - 1].float(), hs[j].float(), dim=-1)
                        bi_sum[st.name][j - 1] += float(((1.0 - cos) * fm).sum())
                    bi_count[st.name] += float(fm.sum())
                    unit = torch.nn.functional.normalize(torch.stack([x.float() for x in hs]), dim=-1)
                    for i in range(len(hs) - 1):
                        c = (unit[i:i + 1] * unit[i + 1:]).sum(-1).clamp(-1.0, 1.0)
                        ang = (torch.arccos(c) / torch.pi * fm).sum((1, 2)).double().cpu().numpy()
                        ang_sum[st.name][i, i + 1:] += ang
                        ang_sum[st.name][i + 1:, i] += ang
    finally:
        for h in handles:
            h.remove()
        tokenizer.padding_side = old_side
        torch.set_num_threads(old_threads)
        model.train(was_training)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    out: dict[str, np.ndarray] = {}
    for name, batches in pooled.items():
        arr = np.stack([np.concatenate([b[j] for b in batches], 0) for j in range(len(batches[0]))], 0)
        out[name] = arr[:, inv].astype(np.float32)
    bi = {} if final_only else {k: bi_sum[k] / max(bi_count[k], 1.0) for k in bi_sum}
    ang = {} if final_only else {k: ang_sum[k] / max(bi_count[k], 1.0) for k in ang_sum}
    return Features(out, bi, n_tokens, pooling, ang)
