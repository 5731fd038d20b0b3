"""Generative math: greedy solutions, scored by exact match of the extracted final answer.

The final answer is taken from, in order: a ``#### answer`` line (GSM8K style), the last
``\\boxed{...}``, an "answer is ..." phrase, or else the last number in the text. Answers compare
after normalisation: numbers (with thousands separators, ``$``/``%``, decimals, ``a/b`` or
``\\frac{a}{b}``) compare by value; anything else compares case- and space-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from ..errors import MoeSlimError
from ..prompts import END_TAG
from .generation import greedy_generate

MATH_STOPS: tuple[str, ...] = (END_TAG, "\nQuestion:", "\n\n\n")
#: A "#### answer" line ends the solution: stop right after it.
MATH_STOP_REGEX = re.compile(r"####[ \t]*\S[^\n]*\n")

_HASH = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.I)
_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?|-?\.\d+")
_FRAC = re.compile(r"^\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a generated solution, or None."""
    m = _HASH.search(text)
    if m:
        return m.group(1).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = _ANSWER_IS.search(text)
    if m:
        ans = m.group(1).strip()
        nums = _NUM.findall(ans)
        return nums[0] if nums else ans.rstrip(".").strip()
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


def _as_number(s: str) -> Fraction | None:
    t = s.strip().replace(" ", "")
    t = t.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    t = t.rstrip(".")
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    m = _FRAC.match(t)
    try:
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        if re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+", t):
            return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def normalize_answer(s: str | None) -> str | None:
    """A canonical form: numbers as reduced fractions, other text lowercased with spaces collapsed."""
    if s is None:
        return None
    value = _as_number(s)
    if value is not None:
        return str(value)
    t = s.strip().strip("$").strip()
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    return " ".join(t.lower().rstrip(".").split())


def answers_match(pred: str | None, gold: str) -> bool:
    p, g = normalize_answer(pred), normalize_answer(gold)
    return p is not None and p != "" and p == g


def evaluate_math(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Greedy solutions to each record's ``prompt`` (or ``Question: ...\\nAnswer:``), exact match on ``answer``."""
    if not records:
        raise MoeSlimError("no math records to evaluate")
    prompts = [str(r.get("prompt") or f"Question: {r['question']}\nAnswer:") for r in records]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=MATH_STOPS,
                              stop_regex=MATH_STOP_REGEX, batch_size=batch_size, progress=progress)
    preds = []
    correct = 0
    extracted = 0
    for rec, out in zip(records, outputs):
        pred = extract_answer(out)
        ok = answers_match(pred, str(rec["answer"]))
        correct += ok
        extracted += pred is not None
        preds.append({"id": str(rec["id"]), "gold": str(rec["answer"]), "pred": pred, "correct": ok,
                      "output": out[:1000]})
    n = len(records)
    return {
        "n": n, "exact_match": correct / n, "correct": correct, "answer_found": extracted / n,
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                       "stop_strings": list(MATH_STOPS), "stop_regex": MATH_STOP_REGEX.pattern},
        "predictions": preds,
    }
