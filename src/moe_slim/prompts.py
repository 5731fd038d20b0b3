"""The one translation prompt format every part of moe_slim shares.

Data builders, evaluation, training of the reference model and SFT all format translation pairs
through these functions, so a change here changes them all together.

A pair is written as ``<|en|>{source}<|de|>{target}<|end|>``: the prompt ends with the target
language tag, the target ends with ``<|end|>``. The reference tokenizer has these tags as special
tokens; for other tokenizers they are ordinary text, which still works as a fixed template.
"""

from __future__ import annotations

SOURCE_LANG = "en"
TARGET_LANGS: tuple[str, ...] = ("de", "fr", "es")
END_TAG = "<|end|>"
LANG_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish"}


def lang_tag(lang: str) -> str:
    """The special token that names a language, e.g. ``<|de|>``."""
    return f"<|{lang}|>"


SPECIAL_TOKENS: tuple[str, ...] = tuple(lang_tag(x) for x in (SOURCE_LANG, *TARGET_LANGS)) + (END_TAG,)


def translation_prompt(source: str, tgt_lang: str, src_lang: str = SOURCE_LANG) -> str:
    """The prompt a model continues with the translation."""
    return f"{lang_tag(src_lang)}{source}{lang_tag(tgt_lang)}"


def translation_target(target: str) -> str:
    """The continuation a model is trained to produce (and stops after)."""
    return f"{target}{END_TAG}"


def translation_text(source: str, target: str, tgt_lang: str, src_lang: str = SOURCE_LANG) -> str:
    """Prompt and target as one training / calibration text."""
    return translation_prompt(source, tgt_lang, src_lang) + translation_target(target)


def cut_generation(text: str) -> str:
    """The translation part of a generated continuation: up to the end tag or a newline."""
    for stop in (END_TAG, "\n", "<|"):
        pos = text.find(stop)
        if pos >= 0:
            text = text[:pos]
    return text.strip()
