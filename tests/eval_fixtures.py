"""Offline fixtures for the evaluation tests and benchmark: a tiny tokenizer, a tiny MoE, tiny data.

Nothing here touches the network or the real ``data/`` directory: the tokenizer is trained in
milliseconds on fixture text with the ``tokenizers`` library, the model is a randomly initialised
Qwen3-MoE built from a config, and the data files are written to a directory the caller gives.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from moe_slim.prompts import (
    SPECIAL_TOKENS,
    translation_prompt,
    translation_target,
    translation_text,
)

EOS = "<|endoftext|>"
PAD = "<|pad|>"

_SUBJECTS = ["the cat", "my brother", "the old man", "a small dog", "the teacher", "our neighbour", "the child"]
_VERBS = ["sees", "likes", "finds", "buys", "paints", "wants", "needs"]
_OBJECTS = ["a red house", "the blue car", "some bread", "a big tree", "the green book", "fresh water", "the moon"]
_TRANSLATIONS = {
    "de": (["die Katze", "mein Bruder", "der alte Mann", "ein kleiner Hund", "der Lehrer", "unser Nachbar", "das Kind"],
           ["sieht", "mag", "findet", "kauft", "malt", "will", "braucht"],
           ["ein rotes Haus", "das blaue Auto", "etwas Brot", "einen großen Baum", "das grüne Buch", "frisches Wasser",
            "den Mond"]),
    "fr": (["le chat", "mon frère", "le vieil homme", "un petit chien", "le professeur", "notre voisin", "l'enfant"],
           ["voit", "aime", "trouve", "achète", "peint", "veut", "a besoin de"],
           ["une maison rouge", "la voiture bleue", "du pain", "un grand arbre", "le livre vert", "de l'eau fraîche",
            "la lune"]),
    "es": (["el gato", "mi hermano", "el anciano", "un perro pequeño", "el profesor", "nuestro vecino", "el niño"],
           ["ve", "quiere", "encuentra", "compra", "pinta", "desea", "necesita"],
           ["una casa roja", "el coche azul", "pan", "un árbol grande", "el libro verde", "agua fresca", "la luna"]),
}
_CODE = [
    "def add(a, b):\n    total = a + b\n    return total\n\n\ndef sub(a, b):\n    diff = a - b\n    return diff\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def step(self):\n        self.count += 1\n"
    "        return self.count\n",
    "import os\n\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)\n    else:\n"
    "        continue\n",
    "values = [1, 2, 3, 4]\nsquares = []\nfor v in values:\n    squares.append(v * v)\nprint(sum(squares))\n"
    "print(len(squares))\n",
]
_GENERAL = [
    "The river runs past the old mill. Children play on the bank every summer afternoon. "
    "In the evening the water turns gold under the setting sun.",
    "A good breakfast starts the day well. Many people drink coffee with warm bread. "
    "Others prefer tea and a bowl of fresh fruit in the morning.",
    "The library opens at nine. Students come early to find a quiet table near the window. "
    "By noon every seat in the reading room is taken.",
    "Winter came late this year. The first snow fell in the middle of January. "
    "The roads were white and the schools closed for two whole days.",
]


def _sentence(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(len(_SUBJECTS)), rng.randrange(len(_VERBS)), rng.randrange(len(_OBJECTS))


def fixture_records(n_per_domain: int = 12, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Test-split records of every domain in the data format the toolkit reads."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, Any]]] = {"translation": [], "math": [], "code": [], "general": []}
    for i in range(n_per_domain):
        s, v, o = _sentence(rng)
        src = f"{_SUBJECTS[s]} {_VERBS[v]} {_OBJECTS[o]}".capitalize() + f" ({i})."
        for lang, (subs, verbs, objs) in _TRANSLATIONS.items():
            ref = f"{subs[s]} {verbs[v]} {objs[o]}".capitalize() + f" ({i})."
            out["translation"].append({
                "id": f"tr-{lang}-{i}", "domain": "translation", "origin": "fixture", "src": src, "ref": ref,
                "src_lang": "en", "tgt_lang": lang, "prompt": translation_prompt(src, lang),
                "target": translation_target(ref), "text": translation_text(src, ref, lang),
            })
        a, b = rng.randrange(2, 60), rng.randrange(2, 40)
        question = f"Tom has {a} apples and buys {b} more. How many apples does he have now?"
        solution = f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"
        prompt = f"Question: {question}\nAnswer:"
        out["math"].append({"id": f"math-{i}", "domain": "math", "origin": "fixture", "question": question,
                            "solution": solution, "answer": str(a + b), "prompt": prompt,
                            "text": f"{prompt} {solution}"})
        code = _CODE[i % len(_CODE)].replace("a", "a" * (1 + i // len(_CODE)), 1)
        out["code"].append({"id": f"code-{i}", "domain": "code", "origin": "fixture", "text": code})
        general = _GENERAL[i % len(_GENERAL)] + f" This was note number {i} of the {_OBJECTS[o].split()[-1]}."
        out["general"].append({"id": f"gen-{i}", "domain": "general", "origin": "fixture", "text": general})
    return out


def write_fixture_data(root: str | os.PathLike, n_per_domain: int = 12, seed: int = 0,
                       splits: tuple[str, ...] = ("test",)) -> Path:
    """Write ``root/<domain>/<split>.jsonl`` fixture files and return ``root``."""
    root = Path(root)
    for domain, records in fixture_records(n_per_domain, seed).items():
        (root / domain).mkdir(parents=True, exist_ok=True)
        for split in splits:
            with open(root / domain / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return root


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [r["text"] for recs in fixture_records(40).values() for r in recs]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, *SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A fresh byte-level BPE tokenizer trained offline on the fixture text, with the prompt tags as special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(SPECIAL_TOKENS))


def tiny_moe(tokenizer: Any, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2,
             num_experts: int = 4, moe_intermediate_size: int = 16, **overrides: Any) -> Any:
    """A randomly initialised Qwen3-MoE sized to ``tokenizer``, in eval mode."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        moe_intermediate_size=moe_intermediate_size, num_experts=num_experts, num_experts_per_tok=2,
        max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs))
    with torch.no_grad():  # larger logits than the default init: decisive, varied greedy choices
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.eval()


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, then restore (tiny models are faster single-threaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_checkpoint(model: Any, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save model and tokenizer as a checkpoint directory that ``moe_slim.loading.load_model`` reads."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
