"""The points of a sweep (``mixes x methods x ratios x budgets`` plus the baseline) and their keys.

A point's key hashes its canonical configuration together with everything the result depends on
(model content hash, calibration, evaluation, merge settings, seed), so a re-run skips done points
and a changed model or evaluation makes new ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from ..errors import MoeSlimError

# -- spec ---------------------------------------------------------------------------------------


@dataclass
class Point:
    """One configuration of the grid. ``method == "none"`` is the unpruned baseline."""

    method: str
    kind: str  # "baseline" | "prune" | "merge"
    ratio: float
    budget: str
    mix: dict[str, float] | None
    name: str | None = None  # the mix's name in the spec, if it has one

    @property
    def mix_label(self) -> str:
        return self.name or mix_label(self.mix)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "kind": self.kind, "ratio": self.ratio, "budget": self.budget, "mix": self.mix}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:n]


def point_key(point: Point, shared: dict[str, Any]) -> str:
    """Hash of a point's canonical configuration (with everything its result depends on)."""
    return _hash({"point": point.config(), "shared": shared}, 32)


def mix_label(mix: dict[str, float] | None) -> str:
    if not mix:
        return "-"
    return ",".join(f"{d}={w:g}" for d, w in mix.items())


def _normalise_mix(mix: dict[str, float]) -> dict[str, float]:
    total = sum(mix.values())
    return {d: round(w / total, 6) for d, w in sorted(mix.items()) if w > 0}


def simplex_grid(domains: list[str], step: float) -> list[dict[str, float]]:
    """Every mix over ``domains`` whose weights are multiples of ``step`` and sum to 1."""
    n = round(1.0 / step)
    if n < 1 or abs(n * step - 1.0) > 1e-6:
        raise MoeSlimError(f"spec: mixes grid step {step} must divide 1 (e.g. 0.5, 0.25, 0.1)")
    out = []
    for parts in itertools.product(range(n + 1), repeat=len(domains)):
        if sum(parts) == n:
            out.append(_normalise_mix({d: p / n for d, p in zip(domains, parts)}))
    return out
