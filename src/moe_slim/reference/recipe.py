"""What defines the reference MoE: the recipe, its tokenizer, the training stream and the loss.

No pretrained MoE can be downloaded on our machines, so moe_slim ships its own: a byte-level BPE
tokenizer with the translation-prompt tags as special tokens, and a Qwen3-MoE (the code path of
Qwen3-30B-A3B) with fine-grained experts (32 per layer, top-4), built by sparse upcycling: a dense
model (one FFN per layer, as wide as one expert) is trained first, every expert of a layer starts
as a copy of that layer's FFN (plus a little noise), and the MoE then trains with the
load-balancing loss on a domain-balanced stream of the ``train`` split. Its experts specialise by
domain, which is what pruning for a task exploits.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from ..errors import MoeSlimError
from ..prompts import SPECIAL_TOKENS, TARGET_LANGS, lang_tag, translation_text
from . import REFERENCE_DIR  # noqa: F401  (re-exported)

DOMAINS: tuple[str, ...] = ("general", "math", "code", "translation")


@dataclass
class Recipe:
    """Everything that defines the reference model; recorded in its card."""

    seed: int = 1234
    vocab_size: int = 4096
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 48
    moe_intermediate_size: int = 64
    num_experts: int = 32
    num_experts_per_tok: int = 4
    router_aux_loss_coef: float = 0.02
    seq_len: int = 256
    batch_size: int = 8
    # sparse upcycling: steps of the dense model (FFN as wide as one expert) before the MoE; 0 = from scratch.
    # v4 ships from scratch: upcycled (1000 dense + 3000 MoE steps) tied on quality but specialised in 2 of 6
    # layers against 4 of 6 (docs/reference_recipe.md, bench/bench_upcycling.py)
    dense_steps: int = 0
    # std of the Gaussian noise added to each expert copy, relative to the std of the copied weight
    upcycle_noise: float = 0.01
    steps: int = 4000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.05
    # general, math, code, translation: translation needs most of the steps to learn the mapping
    domain_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.7)
    max_docs_per_domain: int = 120000  # every train pair (104k translation); above it, a seeded sample
    # copied target-language text as extra translation pairs (source = target; Currey et al. 2017,
    # "Copied Monolingual Data Improves Low-Resource Neural Machine Translation"): teaches copying the
    # names, options and placeholders gettext messages are full of. A fraction of the train pairs.
    copy_fraction: float = 0.0
    # phase 2: translation-heavy continuation (the source-to-target mapping needs more steps)
    phase2_steps: int = 0
    phase2_lr: float = 1e-3
    phase2_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.7)
    # loss only on the target side of translation pairs (the English source is given, not predicted);
    # tried at 1000 steps: no gain (docs/reference_recipe.md), so off
    target_only_loss: bool = False
    # cross-entropy label smoothing: +1.6 to +2.8 validation chrF per pair at 4000 steps (the recipe runs ~5
    # epochs of the translation pairs; without it training loss on targets was 0.9 nats below validation)
    label_smoothing: float = 0.1


def _read_texts(data_dir: Path, domain: str, split: str, limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` texts of one domain's split: all of them, or a seeded sample of ``limit`` (in file
    order). Not the first ``limit`` lines: the files are sorted by id, so those would be one language pair."""
    path = data_dir / domain / f"{split}.jsonl"
    if not path.exists():
        raise MoeSlimError(f"no {split} data for domain {domain} at {path} (run `moe-slim data build`)")
    with path.open(encoding="utf-8") as f:
        out = [json.loads(line)["text"] for line in f if line.strip()]
    if not out:
        raise MoeSlimError(f"domain {domain} has no {split} text at {path}")
    if len(out) > limit:
        picked = sorted(random.Random(f"{seed}:{domain}:{split}").sample(range(len(out)), limit))
        out = [out[i] for i in picked]
    return out


def copied_pairs(data_dir: str | os.PathLike, fraction: float, seed: int) -> list[str]:
    """Translation texts whose source is a copy of the target, for a seeded ``fraction`` of the train pairs."""
    if fraction <= 0:
        return []
    with (Path(data_dir) / "translation" / "train.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    picked = random.Random(seed).sample(rows, min(len(rows), round(fraction * len(rows))))
    return [translation_text(r["ref"], r["ref"], r["tgt_lang"]) for r in picked]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the corpus, with pad/eos/unk and the translation tags as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<|endoftext|>", "<unk>", *SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=list(SPECIAL_TOKENS))
    fast.model_max_length = 4096
    return fast


def _stream(tok: Any, texts: list[str], seed: int, source_given: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All texts of one domain, shuffled (seeded), tokenised and joined with EOS.

    Returns the token ids and, per token, whether it is a loss target. With ``source_given``, a
    translation text's tokens up to and including its target-language tag are not targets.
    """
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    target_tags = {tok.convert_tokens_to_ids(lang_tag(x)) for x in TARGET_LANGS}
    ids: list[int] = []
    given: list[int] = []  # per text: how many leading tokens are given, not predicted
    enc = tok([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    for e in enc:
        ids.extend(e)
        ids.append(tok.eos_token_id)
        if source_given:
            given.append(next((i + 1 for i, t in enumerate(e) if t in target_tags), 0))
    predict = torch.ones(len(ids), dtype=torch.bool)
    pos = 0
    for e, n in zip(enc, given):  # empty unless source_given
        predict[pos : pos + n] = False
        pos += len(e) + 1
    return torch.tensor(ids, dtype=torch.long), predict


def training_loss(out: Any, labels: torch.Tensor, label_smoothing: float, aux_coef: float) -> torch.Tensor:
    """Next-token cross-entropy over the non-ignored labels (-100), with label smoothing, plus the
    load-balancing loss: with smoothing 0 and every token a label, exactly transformers' own loss."""
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100,
                                             label_smoothing=label_smoothing)
    if out.aux_loss is not None:
        loss = loss + aux_coef * out.aux_loss
    return loss


def build_model(recipe: Recipe, tok: Any, *, dense: bool = False) -> Qwen3MoeForCausalLM:
    """The MoE of the recipe; with ``dense``, the same model with one FFN per layer as wide as one expert
    (the starting point of sparse upcycling, :func:`upcycle`)."""
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim, moe_intermediate_size=recipe.moe_intermediate_size,
        intermediate_size=recipe.moe_intermediate_size * (1 if dense else 2), num_experts=recipe.num_experts,
        mlp_only_layers=list(range(recipe.num_hidden_layers)) if dense else [],
        num_experts_per_tok=recipe.num_experts_per_tok, norm_topk_prob=True,
        router_aux_loss_coef=recipe.router_aux_loss_coef, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(recipe.seed)
    return Qwen3MoeForCausalLM(cfg)


@torch.no_grad()
def upcycle(dense: Qwen3MoeForCausalLM, recipe: Recipe, tok: Any) -> Qwen3MoeForCausalLM:
    """Sparse upcycling (Komatsuzaki et al. 2023): the recipe's MoE with every weight of ``dense``
    copied, and every expert of a layer a copy of that layer's dense FFN plus Gaussian noise of
    ``upcycle_noise`` times the weight's std (seeded). Routers keep their fresh initialisation.
    With zero noise the MoE computes exactly what the dense model does (the top-k weights sum to 1)."""
    moe = build_model(recipe, tok).to(next(dense.parameters()).device)
    state = dense.state_dict()
    g = torch.Generator(device="cpu").manual_seed(recipe.seed + 1)
    for name, param in moe.named_parameters():
        if name in state:
            param.copy_(state[name])
            continue
        if ".mlp.gate." in name:
            continue
        prefix = name.split(".mlp.")[0] + ".mlp."
        if name.endswith("experts.gate_up_proj"):
            w = torch.cat([state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"]], dim=0)
        elif name.endswith("experts.down_proj"):
            w = state[prefix + "down_proj.weight"]
        else:
            raise RuntimeError(f"upcycle: no dense weight for {name}")
        noise = torch.randn((param.shape[0], *w.shape), generator=g).to(w.device) * (recipe.upcycle_noise * w.std())
        param.copy_(w.unsqueeze(0) + noise)
    return moe
