"""Tiny dense/encoder/seq2seq/MoE models, a word-level toy tokenizer and synthetic probe tasks.

Offline and fast: the tests (and anyone trying the dense tools without a pretrained model) use
these. :func:`make_identity_layers` zeroes the residual writes of chosen layers (attention output
and MLP down projection), so those layers pass the residual stream through unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

WORDS: tuple[str, ...] = tuple(f"w{i}" for i in range(60))
SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def toy_tokenizer() -> Any:
    """A whitespace word-level fast tokenizer over :data:`WORDS` (ids 0-3 are specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


VOCAB = len(SPECIALS) + len(WORDS)

_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)

TINY: dict[str, dict[str, Any]] = {
    "llama": dict(_DEC, num_hidden_layers=6),
    "qwen2": dict(_DEC, num_hidden_layers=4),
    "qwen3_moe": dict(_DEC, num_hidden_layers=4, head_dim=8, moe_intermediate_size=16, num_experts=4,
                      num_experts_per_tok=2, mlp_only_layers=[1], decoder_sparse_step=1),
    "bert": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0),
    "t5": dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=3),
}


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny model: causal LM, BERT masked LM or T5 seq2seq."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
    )

    cfg = AutoConfig.for_model(model_type, **{**TINY[model_type], **overrides})
    torch.manual_seed(seed)
    if model_type == "bert":
        model = AutoModelForMaskedLM.from_config(cfg)
    elif getattr(cfg, "is_encoder_decoder", False):
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@torch.no_grad()
def make_identity_layers(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """Zero what the given decoder layers write into the residual stream (o_proj and down_proj)."""
    for i in layers:
        layer = model.base_model.layers[i]
        layer.self_attn.o_proj.weight.zero_()
        if getattr(layer.self_attn.o_proj, "bias", None) is not None:
            layer.self_attn.o_proj.bias.zero_()
        layer.mlp.down_proj.weight.zero_()
        if getattr(layer.mlp.down_proj, "bias", None) is not None:
            layer.mlp.down_proj.bias.zero_()
    return model


def save_tiny(model: torch.nn.Module, path: str | Path) -> Path:
    """Save a tiny model with the toy tokenizer, as a checkpoint directory."""
    p = Path(path)
    model.save_pretrained(str(p))
    toy_tokenizer().save_pretrained(str(p))
    return p


def synthetic_tasks(folder: str | Path, n_per_class: int = 40, seed: int = 0) -> dict[str, Path]:
    """Two JSONL tasks: ``topic`` (which word set a text draws from, 3 labels) and ``order``
    (whether ``w50`` comes before or after ``w51``: invisible to mean-pooled embeddings)."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {"a": WORDS[0:15], "b": WORDS[15:30], "c": WORDS[30:45]}
    filler = WORDS[45:50]
    topic = []
    for lab, words in sets.items():
        for _ in range(n_per_class):
            toks = [rng.choice(words) for _ in range(rng.randint(5, 10))] + [rng.choice(filler) for _ in range(3)]
            rng.shuffle(toks)
            topic.append({"text": " ".join(toks), "label": lab})
    order = []
    for lab in ("before", "after"):
        for _ in range(n_per_class):
            toks = [rng.choice(WORDS[:45]) for _ in range(rng.randint(4, 8))]
            i = rng.randint(0, len(toks))
            j = rng.randint(i, len(toks))
            first, second = ("w50", "w51") if lab == "before" else ("w51", "w50")
            toks = toks[:i] + [first] + toks[i:j] + [second] + toks[j:]
            order.append({"text": " ".join(toks), "label": lab})
    out = {}
    for name, recs in (("topic", topic), ("order", order)):
        rng.shuffle(recs)
        f = folder / f"{name}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
        out[name] = f
    return out
