"""Parsing helpers the command modules share.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from ..schema import MAX_INT, MAX_SEQ_LEN, MAX_TOKENS  # the same bounds as the YAML specs


def _tokens(text: str) -> int:
    """``200k`` / ``1.5M`` / ``5000`` -> a token count; anything else is a one-line error."""
    from ..errors import MoeSlimError

    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except (ValueError, OverflowError):
        raise MoeSlimError(f"'{text}' is not a token count (write e.g. 5000, 200k or 1.5M)") from None
    if value <= 0:
        raise MoeSlimError(f"a token count must be positive, not '{text}'")
    if value > MAX_TOKENS:
        raise MoeSlimError(f"a token count must be at most {MAX_TOKENS:,}, not '{text}'")
    return value


def _number(kind: type, text: str, ok: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: 0 < v <= MAX_INT, f"a positive integer (at most {MAX_INT})")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: 0 <= v <= MAX_INT, f"a non-negative integer (at most {MAX_INT})")


def seq_len(text: str) -> int:
    """A sequence length in tokens: positive, and no longer than any model's context could be."""
    return _number(int, text, lambda v: 0 < v <= MAX_SEQ_LEN, f"a positive integer (at most {MAX_SEQ_LEN})")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0 and math.isfinite(v), "a positive number")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")


def fraction(text: str) -> float:
    """A share of experts removed: strictly between 0 and 1."""
    return _number(float, text, lambda v: 0 < v < 1, "a share strictly between 0 and 1")


def probability(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def add_data_dir(p: argparse.ArgumentParser, what: str = "built data directory") -> None:
    """``--data-dir``, the one name of the data directory option (``--data`` still works, unlisted)."""
    p.add_argument("--data-dir", dest="data_dir", default=None,
                   help=f"{what} (default: $MOE_SLIM_DATA, else ./data, else the moe_slim checkout's data/)")
    p.add_argument("--data", dest="data_dir", help=argparse.SUPPRESS)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the results as one JSON object (nothing else on stdout)")


def emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """The command's results: ``text`` for people, or ``result`` as JSON with ``--json``."""
    import json

    print(json.dumps(result, indent=2, sort_keys=True, default=str) if getattr(args, "json", False) else text)


def add_out(p: argparse.ArgumentParser, what: str, *, default: str | None = None) -> None:
    """``--out`` and ``--overwrite``, saying what the command writes and the one output rule
    (:mod:`moe_slim.outputs`): created new, replaced only with ``--overwrite`` and only by the same kind."""
    where = f" (default: {default})" if default is not None else ""
    p.add_argument("--out", required=default is None, default=default,
                   help=f"{what} to write{where}; the command writes nothing else but its cache "
                        "(~/.cache/moe_slim)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing --out of the same kind ({what} moe_slim wrote; never a directory "
                        "of yours, an input, or another kind of output)")
