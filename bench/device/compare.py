"""Statistics of a device run against the CPU run of the same inputs: what must agree, and how closely.

float32 on a GPU runs other kernels than on a CPU, so float sums differ by rounding, while the routing
decisions (counts, co-selections, tokens) must be identical. bfloat16 rounds the hidden states to 8
bits of mantissa, so routing near ties flips: there only the token totals and the number of
selections per layer are exact, and the per-expert counts and sums must stay close (a guard against
a broken path — garbage routing agrees far less — not a promise of bf16 accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: fields that count things: exact in float32 whatever the kernels
COUNT_FIELDS = ("tokens", "count", "coselect")
FLOAT32_RTOL = 1e-4  # float64 sums of float32 values from other kernels (measured differences ~1e-6)
SAMPLE_RTOL = 1e-3  # merge samples (layer inputs after several layers, router logits), at each field's scale
# bf16 against float32 on CPUs (2026-12-06): count agreement >= 0.9936 on all 11 tiny families and 0.9978
# on the generated Qwen3-MoE (2 layers x 96 experts, 16k tokens); sums within 0.6% cell by cell
BF16_COUNT_AGREEMENT = 0.90  # share of per-expert selections placed alike
BF16_SUM_RTOL = 0.05  # each field's total (all layers and experts)


@dataclass
class Comparison:
    """The outcome of one comparison: whether it holds, why not, and its figures (one row per field)."""

    name: str
    problems: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - (half the L1 distance of two count tables) / their total: 1.0 when every count is equal."""
    total = float(a.sum())
    return 1.0 - float((a - b).abs().sum()) / (2 * total) if total else 1.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the field's own scale (sums of vectors cancel elementwise)."""
    scale = float(a.abs().max()) if a.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale else float((a - b).abs().max()) if a.numel() else 0.0


def compare_stats(name: str, ref: Any, got: Any, dtype: str = "float32") -> Comparison:
    """Compare two RouterStats of the same inputs (``ref`` on a CPU in float32; ``got`` run in ``dtype``)."""
    cmp = Comparison(name)
    if ref.domains.keys() != got.domains.keys():
        cmp.problems.append(f"domains {sorted(got.domains)} != {sorted(ref.domains)}")
        return cmp
    for d in sorted(ref.domains):
        for f, a in sorted(ref.domains[d].items()):
            b = got.domains[d].get(f)
            if b is None or b.shape != a.shape:
                cmp.problems.append(f"{d}/{f}: missing or shape {None if b is None else tuple(b.shape)}")
                continue
            row = dict(field=f"{d}/{f}", max_abs=float((a - b).abs().max()) if a.numel() else 0.0, rel=_rel(a, b),
                       agreement=_agreement(a, b) if f == "count" else None)
            cmp.rows.append(row)
            exact = f == "tokens" or (dtype == "float32" and f in COUNT_FIELDS)
            if exact and not torch.equal(a, b):
                cmp.problems.append(f"{d}/{f} differs in {int((a != b).sum())} of {a.numel()} cells "
                                    f"(largest {row['max_abs']:g})")
            elif dtype == "float32" and f not in COUNT_FIELDS and row["rel"] > FLOAT32_RTOL:
                cmp.problems.append(f"{d}/{f} differs by {row['rel']:.2e} of its scale (> {FLOAT32_RTOL:g})")
            elif dtype != "float32" and f == "count":
                if not torch.equal(a.sum(1), b.sum(1)):
                    cmp.problems.append(f"{d}/count: selections per layer differ ({a.sum(1).tolist()} != "
                                        f"{b.sum(1).tolist()})")
                if row["agreement"] < BF16_COUNT_AGREEMENT:
                    cmp.problems.append(f"{d}/count agreement {row['agreement']:.3f} < {BF16_COUNT_AGREEMENT}")
            elif dtype != "float32" and f in ("weight_sum", "norm_sum", "wnorm_sum", "soft_sum"):
                ta, tb = float(a.sum()), float(b.sum())
                if abs(ta - tb) > BF16_SUM_RTOL * abs(ta):
                    cmp.problems.append(f"{d}/{f} total {tb:.6g} vs {ta:.6g} (> {BF16_SUM_RTOL:.0%} apart)")
    if dtype == "float32" and ref.samples is not None and got.samples is not None:
        sa, sb = ref.samples.tensors(), got.samples.tensors()
        if sa.keys() != sb.keys():
            cmp.problems.append("merge samples hold other fields")
        for k in sorted(sa.keys() & sb.keys()):
            if sa[k].shape != sb[k].shape:
                cmp.problems.append(f"sample {k}: shape {tuple(sb[k].shape)} != {tuple(sa[k].shape)}")
            elif not sa[k].is_floating_point() and not torch.equal(sa[k], sb[k]):
                cmp.problems.append(f"sample {k} differs")
            elif sa[k].is_floating_point() and _rel(sa[k].double(), sb[k].double()) > SAMPLE_RTOL:
                cmp.problems.append(f"sample {k} differs by {_rel(sa[k].double(), sb[k].double()):.2e} of its scale")
    return cmp
