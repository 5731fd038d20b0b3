"""How the benchmarks print a paired difference: one format, one rule for a tie."""

from __future__ import annotations


def difference_text(delta: float, ci95: list[float] | tuple[float, float], digits: int = 2) -> str:
    """``+1.23 (-0.40 … +2.80), tie``: the difference, its 95% interval, and 'tie' when the interval holds 0."""
    lo, hi = ci95
    f = f"{{:+.{digits}f}}"
    return f"{f.format(delta)} ({f.format(lo)} … {f.format(hi)})" + (", tie" if lo <= 0 <= hi else "")
