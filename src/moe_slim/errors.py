"""One exception type for every user-facing failure.

The CLI turns a :class:`MoeSlimError` into a single line ``moe-slim: <message>`` and a non-zero
exit, so every message must say what was wrong and what to do about it, on one line.
"""

from __future__ import annotations


class MoeSlimError(Exception):
    """A bad input or an impossible request, explained in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
