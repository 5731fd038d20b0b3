"""Running a grafted MTP layer (:mod:`moe_slim.modeling.mtp`) as transformers' ``MtpLayer.forward`` runs it.

Depth ``k`` reads, at position ``t``, the embedding of token ``t + k + 1`` and the hidden state at ``t`` of
the depth before it (depth 0: the main model's final, normed hidden state, as ``generate(use_mtp=True)``
passes it): ``eh_proj(cat(enorm(embed), hnorm(h)))``, the decoder layer with the rope and masks of the MTP
layer's type (as ``MtpModel.create_masks_for_mtp_layer`` makes them), then the output norm.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import MoeSlimError
from .mtp import mtp_of


def mtp_step(model: nn.Module, depth: int, previous: torch.Tensor, next_ids: torch.Tensor,
             attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
    """One MTP depth, as transformers' ``MtpLayer.forward``: ``previous`` is the hidden state the depth reads
    (the main model's final one for depth 0), ``next_ids`` the tokens one step further along."""
    info = mtp_of(model)
    assert info is not None
    d = info.depths[depth]
    missing = [r for r in ("enorm", "hnorm", "eh_proj") if r not in d.roles]
    if missing:
        raise MoeSlimError(f"MTP layer {d.prefix} has no {missing[0]} (a layout moe_slim cannot run)")
    part = {r: model.get_submodule(p) for r, p in d.roles.items()}
    embedding = model.get_input_embeddings()
    dev = part["eh_proj"].weight.device  # a device map may place the MTP layer apart from the embedding
    embeds = embedding(next_ids.to(embedding.weight.device)).to(dev, previous.dtype)
    previous, position_ids = previous.to(dev), position_ids.to(dev)
    attention_mask = attention_mask.to(dev) if attention_mask is not None else None
    pieces = [part["enorm"](embeds), part["hnorm"](previous)]
    x = part["eh_proj"](torch.cat(pieces[::-1] if info.hidden_first else pieces, dim=-1))
    layer_type = (getattr(info.config, "layer_types", None) or [None] * (depth + 1))[depth]
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(base, "rotary_emb", None)
    per_layer = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
    position_embeddings = None if rotary is None else (
        rotary(x, position_ids, layer_type=layer_type) if per_layer else rotary(x, position_ids))
    x = model.get_submodule(d.prefix)(x, position_embeddings=position_embeddings, position_ids=position_ids,
                                      **_masks(info.config, layer_type, x, attention_mask, position_ids))
    if isinstance(x, tuple):
        x = x[0]
    return part["post_norm"](x) if "post_norm" in part else x


def _masks(config: Any, layer_type: str | None, x: torch.Tensor, attention_mask: torch.Tensor | None,
           position_ids: torch.Tensor) -> dict[str, Any]:
    """The masks an MTP layer of ``layer_type`` takes, as ``MtpModel.create_masks_for_mtp_layer`` makes them."""
    from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_causal_mask

    kwargs = dict(config=config, inputs_embeds=x, attention_mask=attention_mask, cache=None, position_ids=position_ids)
    fns = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(layer_type) if layer_type else None
    fns = fns if isinstance(fns, dict) else {layer_type if fns else "full_attention": fns or create_causal_mask}
    names = {"full_attention": "attention_mask", "sliding_attention": "attention_mask", "linear_attention": "conv_mask"}
    # a materialised mask where the function can skip it: indexed (DSA) attention's indexer reads the mask itself,
    # as the model's own forward forces it (allow_is_causal_skip=False); for the others it is the same mask
    return {names.get(t, "attention_mask"): fn(**kwargs, **({"allow_is_causal_skip": False} if "allow_is_causal_skip"
                                                           in inspect.signature(fn).parameters else {}))
            for t, fn in fns.items()}


def shifted(ids: torch.Tensor, mask: torch.Tensor, by: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``by`` steps ahead (0 past the end) and where both a token and its successor are real."""
    nxt = torch.zeros_like(ids)
    nxt[:, : ids.shape[1] - by] = ids[:, by:]
    ahead = torch.zeros_like(mask)
    ahead[:, : mask.shape[1] - by] = mask[:, by:]
    return nxt, mask.bool() & ahead.bool()
