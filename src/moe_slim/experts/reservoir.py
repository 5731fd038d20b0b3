"""A deterministic uniform sample of a token stream (the merge sample of each domain and layer).

Algorithm R, with one change that makes it splittable: the random number of stream row ``g`` is a
hash of ``(seed, g)`` rather than the next draw of a generator. A row's fate then depends on its
position alone, so processes that each see part of the stream (data-parallel observation) keep
exactly the rows one process would keep, and :func:`combine` puts them together: every slot holds
the row with the highest position among those that chose it.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniforms(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """``[0, 1)`` numbers for stream positions, a pure function of ``(seed, position)`` (splitmix64)."""
    with np.errstate(over="ignore"):
        z = positions.cpu().numpy().astype(np.uint64) * _GOLDEN + np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / float(2**53))


class Reservoir:
    """A deterministic uniform sample of at most ``cap`` rows of a stream.

    Row ``g`` of the stream (0-based) fills slot ``g`` while ``g < cap``; later it replaces slot
    ``j = floor(u(g) * (g + 1))`` when ``j < cap``. The same stream and seed give the same sample,
    however the stream is cut into calls, and whichever process sees which part of it.
    """

    def __init__(self, cap: int, seed: int) -> None:
        self.cap = int(cap)
        self.seed = int(seed)
        self.seen = 0  # rows offered so far (the next row's position, unless ``plan`` is told otherwise)
        self.data: dict[str, torch.Tensor] = {}
        self.position = torch.full((0,), -1, dtype=torch.long)  # stream position of the row in each slot

    def plan(self, n: int, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``n`` new rows (at stream positions ``start...``) enter the sample, and their slots."""
        start = self.seen if start is None else int(start)
        g = torch.arange(start, start + n, dtype=torch.long)
        j = torch.floor(uniforms(self.seed, g) * (g + 1).double()).long()
        slots = torch.where(g < self.cap, g, j)
        pos = (slots < self.cap).nonzero().squeeze(1)
        slots = slots[pos]
        if pos.numel():  # a slot drawn twice in one call goes to the later row, as if one by one
            uniq, inv = torch.unique(slots, return_inverse=True)
            last = torch.full((uniq.numel(),), -1, dtype=torch.long).scatter_reduce(
                0, inv, torch.arange(pos.numel()), "amax")
            last = last.sort().values
            pos, slots = pos[last], slots[last]
        self.seen = max(self.seen, start + n)
        self._grow(int(slots.max()) + 1 if slots.numel() else 0)
        self.position[slots] = g[pos]
        return pos, slots

    def _grow(self, need: int) -> None:
        if self.position.numel() < need:
            size = min(self.cap, max(need, 2 * self.position.numel()))
            grown = torch.full((size,), -1, dtype=torch.long)
            grown[: self.position.numel()] = self.position
            self.position = grown

    def put(self, name: str, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        rows = rows.detach().cpu()
        buf = self.data.get(name)
        size = self.position.numel()  # buffers follow the slots ``plan`` has handed out
        if buf is None or buf.shape[0] < size:
            grown = torch.zeros(size, *rows.shape[1:], dtype=rows.dtype)
            if buf is not None:
                grown[: buf.shape[0]] = buf
            buf = self.data[name] = grown
        buf[slots] = rows

    def filled(self) -> int:
        return int((self.position >= 0).sum())

    def result(self) -> dict[str, torch.Tensor]:
        n = self.filled()
        return {k: v[:n].clone() for k, v in self.data.items()}


def combine(parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The sample of the whole stream from the samples of its parts: ``(positions, tensors)`` per part,
    as reservoirs of the same seed and cap hold them. Each slot keeps the row of the highest position."""
    size = max((p.numel() for p, _ in parts), default=0)
    best = torch.full((size,), -1, dtype=torch.long)
    owner = torch.full((size,), -1, dtype=torch.long)
    for i, (pos, _) in enumerate(parts):
        better = pos > best[: pos.numel()]
        idx = better.nonzero().squeeze(1)
        best[idx] = pos[idx]
        owner[idx] = i
    n = int((best >= 0).sum())
    out: dict[str, torch.Tensor] = {}
    for name in sorted({k for _, ts in parts for k in ts}):
        first = next(ts[name] for _, ts in parts if name in ts)
        buf = torch.zeros(n, *first.shape[1:], dtype=first.dtype)
        for i, (_, tensors) in enumerate(parts):
            if name not in tensors:
                continue
            idx = (owner[:n] == i).nonzero().squeeze(1)
            buf[idx] = tensors[name][idx]
        out[name] = buf
    return out
