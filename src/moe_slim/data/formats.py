"""Record formats of the data domains: the one place that says how a math problem is written.

Translation records use :mod:`moe_slim.prompts` (the shared translation format); math records use
the functions here. Evaluation reads the final answer back with :func:`extract_math_answer`.

A math record's ``text`` is ``math_prompt(question) + math_target(solution, answer)``::

    Question: Benny saw a 10-foot shark ...
    Answer: First, find the combined length ...
    #### 10
"""

from __future__ import annotations

import re

DOMAINS: tuple[str, ...] = ("translation", "math", "code", "general")
SPLITS: tuple[str, ...] = ("calibration", "train", "validation", "test")
# translation only: whole gettext catalogs that no other split has seen (see data/splits.py)
CATALOG_SPLITS: tuple[str, ...] = ("catalog_validation", "catalog_test")

MATH_ANSWER_MARK = "####"
_ANSWER_RE = re.compile(r"####\s*(.+)")
_NUMBER_WITH_COMMAS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")


def math_prompt(question: str) -> str:
    """The prompt a model continues with a worked solution: ``Question: ...\\nAnswer:``."""
    return f"Question: {question.strip()}\nAnswer:"


def math_target(solution: str, answer: str) -> str:
    """The continuation after :func:`math_prompt`: the worked solution, then ``#### answer``."""
    solution = solution.strip()
    body = f" {solution}\n" if solution else " "
    return f"{body}{MATH_ANSWER_MARK} {answer.strip()}"


def math_text(question: str, solution: str, answer: str) -> str:
    """Prompt and target as one training / calibration text."""
    return math_prompt(question) + math_target(solution, answer)


def normalize_math_answer(answer: str) -> str:
    """The comparable form of a final answer: trimmed, thousands separators and a trailing period
    dropped, ``$`` and ``\\boxed{}`` removed, integral floats written as integers (``12.0`` -> ``12``)."""
    a = answer.strip().rstrip(".").strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", a)
    if boxed:
        a = boxed.group(1).strip()
    a = a.strip("$").strip()
    if _NUMBER_WITH_COMMAS.match(a):
        a = a.replace(",", "")
    if re.fullmatch(r"[-+]?\d+\.0+", a):
        a = a.split(".")[0]
    return a


def extract_math_answer(generation: str) -> str | None:
    """The normalised final answer after the first ``####`` in a generation, or None."""
    match = _ANSWER_RE.search(generation)
    if not match:
        return None
    line = match.group(1).splitlines()[0] if match.group(1) else ""
    return normalize_math_answer(line) or None
