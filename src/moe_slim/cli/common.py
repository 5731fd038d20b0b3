"""Parsing helpers the command modules share.
"""

from __future__ import annotations


def _tokens(text: str) -> int:
    """``200k`` / ``1.5M`` / ``5000`` -> a token count; anything else is a one-line error."""
    from ..errors import MoeSlimError

    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise MoeSlimError(f"'{text}' is not a token count (write e.g. 5000, 200k or 1.5M)") from None
    if value <= 0:
        raise MoeSlimError(f"a token count must be positive, not '{text}'")
    return value
