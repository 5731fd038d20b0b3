"""A deterministic uniform sample of a token stream (the merge sample of each domain and layer).
"""

from __future__ import annotations

import torch


class Reservoir:
    """A deterministic uniform sample of at most ``cap`` rows of a stream (Algorithm R, seeded).

    Row ``g`` of the stream (0-based) fills slot ``g`` while ``g < cap``; later it replaces a
    uniformly drawn slot ``j <= g`` when ``j < cap``. The same stream and seed give the same sample.
    """

    def __init__(self, cap: int, seed: int) -> None:
        self.cap = int(cap)
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.data: dict[str, torch.Tensor] = {}

    def plan(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``n`` new rows enter the sample (their positions) and the slots they take."""
        g = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        j = torch.floor(torch.rand(n, generator=self.gen, dtype=torch.float64) * (g + 1)).long()
        slots = torch.where(g < self.cap, g.long(), j)
        pos = (slots < self.cap).nonzero().squeeze(1)
        slots = slots[pos]
        if pos.numel():  # a slot drawn twice in one call goes to the later row, as if one by one
            uniq, inv = torch.unique(slots, return_inverse=True)
            last = torch.full((uniq.numel(),), -1, dtype=torch.long).scatter_reduce(
                0, inv, torch.arange(pos.numel()), "amax")
            last = last.sort().values
            pos, slots = pos[last], slots[last]
        self.seen += n
        return pos, slots

    def put(self, name: str, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        rows = rows.detach().cpu()
        buf = self.data.get(name)
        need = int(slots.max()) + 1
        if buf is None or buf.shape[0] < need:
            size = min(self.cap, max(need, 2 * (0 if buf is None else buf.shape[0])))
            grown = torch.zeros(size, *rows.shape[1:], dtype=rows.dtype)
            if buf is not None:
                grown[: buf.shape[0]] = buf
            buf = self.data[name] = grown
        buf[slots] = rows

    def result(self) -> dict[str, torch.Tensor]:
        n = min(self.cap, self.seen)
        return {k: v[:n].clone() for k, v in self.data.items()}
