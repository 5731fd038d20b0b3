"""Token samples for merging: a bounded sample of layer inputs, router logits and routing weights
per (domain, MoE layer), stored beside the statistics in ``samples.safetensors``.

These are the only non-sum statistics; they never enter :meth:`RouterStats.mix` or the criteria.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MoeSlimError

SAMPLES_FORMAT = "moe_slim.samples/1"
SAMPLES_FILE = "samples.safetensors"
# per sampled token: the MoE layer's input hidden state [n, H] (model dtype), the router's logits
# [n, E] and the routing weights the experts were called with, dense [n, E] (0 = not selected)
SAMPLE_FIELDS: tuple[str, ...] = ("x", "logits", "route")


class Samples:
    """A bounded token sample per (domain, MoE layer): layer inputs, router logits, routing weights.

    Each domain's sample is a deterministic reservoir (uniform over the tokens the domain supplied,
    padding excluded), so a calibration mix can draw from it in any proportion (:meth:`take`). From
    the inputs every expert's output and intermediate activations can be recomputed for any expert,
    which is all that merging needs. Tensors are named ``<domain>/<layer>/<field>``; a loaded file
    is read lazily, tensor by tensor.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, *, path: str | os.PathLike | None = None,
                 keys: list[str] | None = None) -> None:
        self._tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self._path = Path(path) if path is not None else None
        self._keys = sorted(set(keys or []) | set(self._tensors))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Samples:
        with safe_open(str(path), "pt") as fh:
            keys = list(fh.keys())
        return cls(path=path, keys=keys)

    @staticmethod
    def key(domain: str, layer: int, field: str) -> str:
        return f"{domain}/{layer}/{field}"

    @property
    def domains(self) -> list[str]:
        return sorted({k.rsplit("/", 2)[0] for k in self._keys})

    def has(self, domain: str, layer: int) -> bool:
        return self.key(domain, layer, "x") in self._keys

    def get(self, domain: str, layer: int, field: str) -> torch.Tensor:
        k = self.key(domain, layer, field)
        if k not in self._tensors:
            if self._path is None or k not in self._keys:
                raise KeyError(k)
            with safe_open(str(self._path), "pt") as fh:
                return fh.get_tensor(k)
        return self._tensors[k]

    def count(self, domain: str, layer: int) -> int:
        k = self.key(domain, layer, "x")
        if k in self._tensors:
            return int(self._tensors[k].shape[0])
        if self._path is None or k not in self._keys:
            return 0
        with safe_open(str(self._path), "pt") as fh:
            return int(fh.get_slice(k).get_shape()[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, read into memory."""
        return {k: self.get(*_split_key(k)) for k in self._keys}

    def take(self, layer: int, weights: dict[str, float] | None = None, max_tokens: int | None = None,
             seed: int = 0) -> dict[str, torch.Tensor]:
        """Up to ``max_tokens`` sampled tokens of ``layer`` drawn from the domains in proportion ``weights``.

        ``None`` weights use every domain in proportion to what it holds. Proportions are kept
        exactly: when a domain holds fewer tokens than its share, every share shrinks with it.
        """
        if weights is None:
            weights = {d: float(self.count(d, layer)) for d in self.domains}
        missing = [d for d, w in weights.items() if w > 0 and not self.has(d, layer)]
        if missing:
            raise MoeSlimError(
                f"the token samples have no domain {', '.join(missing)} (they have: {', '.join(self.domains)}; "
                "run observe with --samples on those domains)"
            )
        used = {d: w for d, w in weights.items() if w > 0}
        if not used:
            raise MoeSlimError(f"the token samples of layer {layer} are empty (observe more text with --samples)")
        total_w = sum(used.values())
        avail = {d: self.count(d, layer) for d in used}
        budget = max_tokens if max_tokens is not None else sum(avail.values())
        want = {d: budget * w / total_w for d, w in used.items()}
        scale = min([1.0] + [avail[d] / want[d] for d in used if want[d] > 0])
        parts: dict[str, list[torch.Tensor]] = {f: [] for f in SAMPLE_FIELDS}
        for i, d in enumerate(sorted(used)):
            n = min(avail[d], int(want[d] * scale + 1e-9))
            if n <= 0:
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            idx = torch.randperm(avail[d], generator=g)[:n].sort().values if n < avail[d] else None
            for f in SAMPLE_FIELDS:
                t = self.get(d, layer, f)
                parts[f].append(t if idx is None else t[idx])
        if not parts["x"]:
            raise MoeSlimError(f"the token samples of layer {layer} are empty for this mix (observe more text)")
        return {f: torch.cat(v) for f, v in parts.items()}

    def save(self, path: str | os.PathLike) -> None:
        save_file({k: t.contiguous() for k, t in self.tensors().items()}, str(path),
                  metadata={"format": SAMPLES_FORMAT})

    def combine(self, other: Samples, tokens_self: dict[str, torch.Tensor], tokens_other: dict[str, torch.Tensor],
                cap: int, seed: int = 0) -> Samples:
        """The samples of two runs on disjoint text: a domain in both keeps ``cap`` tokens drawn from the two
        reservoirs in proportion to the tokens each run saw (a uniform sample of the union, in expectation)."""
        out: dict[str, torch.Tensor] = {}
        layers = sorted({int(_split_key(k)[1]) for k in self._keys + other._keys})
        for d in sorted(set(self.domains) | set(other.domains)):
            for l in layers:
                a, b = self.has(d, l), other.has(d, l)
                if not (a or b):
                    continue
                if a != b:
                    src = self if a else other
                    for f in SAMPLE_FIELDS:
                        out[self.key(d, l, f)] = src.get(d, l, f)
                    continue
                ta, tb = float(tokens_self[d][l]), float(tokens_other[d][l])
                na, nb = self.count(d, l), other.count(d, l)
                n = min(cap, na + nb)
                ka = min(na, max(n - nb, int(round(n * ta / max(ta + tb, 1.0)))))
                kb = min(nb, n - ka)
                g = torch.Generator().manual_seed(seed * 7919 + l)
                ia = torch.randperm(na, generator=g)[:ka].sort().values
                ib = torch.randperm(nb, generator=g)[:kb].sort().values
                for f in SAMPLE_FIELDS:
                    out[self.key(d, l, f)] = torch.cat([self.get(d, l, f)[ia], other.get(d, l, f)[ib]])
        return Samples(out)


def _split_key(key: str) -> tuple[str, int, str]:
    d, l, f = key.rsplit("/", 2)
    return d, int(l), f
