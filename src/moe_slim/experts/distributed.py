"""Data-parallel observation under torchrun or ``accelerate launch``: statistics are sums.

Each process observes every ``world``-th calibration batch. Afterwards the per-domain sums are
all-reduced (counts exactly, float64 sums to rounding, maxima with MAX), and the merge samples are
put together so they equal what one process would have kept (:func:`moe_slim.experts.reservoir.combine`:
each token's fate depends on its position in its domain's stream alone). Only rank 0 writes.

    torchrun --nproc-per-node 8 -m moe_slim observe MODEL --calib ... --out stats/
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m moe_slim observe MODEL --calib ... --out stats/
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import MoeSlimError
from .recorder import Recorder
from .reservoir import combine
from .stats import MAX_FIELDS


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def context(device: torch.device | None = None) -> Dist | None:
    """The data-parallel context when launched by torchrun/accelerate with more than one process, else None.

    Starts the default process group when the launcher has not (gloo on CPUs, nccl on GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise MoeSlimError("this torch build has no torch.distributed; run observe in one process")
    if device is not None and device.type == "cuda":
        # NCCL works on the current device; without this every rank's object collectives use cuda:0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size())


def _on_collective_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the process group can reduce it: the sums live on the CPU, and NCCL reduces GPU tensors only."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()) and "gloo" not in str(dist.get_backend()):
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def check_same(ctx: Dist, what: str, value: str) -> None:
    """A one-line error on every rank when the ranks disagree on ``value`` (their calibration, model, ...)."""
    import torch.distributed as dist

    values: list[str | None] = [None] * ctx.world
    dist.all_gather_object(values, value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise MoeSlimError(f"rank {odd[0]} has other {what} than rank 0; every process must be given the same "
                           "model, calibration and settings")


def reduce_recorder(ctx: Dist, recorder: Recorder) -> None:
    """Sum (and max) every rank's statistics into every rank's recorder; put the samples together."""
    import torch.distributed as dist

    for d in sorted(recorder.domains):
        for f, t in sorted(recorder.domains[d].items()):
            op = dist.ReduceOp.MAX if f in MAX_FIELDS else dist.ReduceOp.SUM
            x = _on_collective_device(t)
            dist.all_reduce(x, op=op)
            if x is not t:
                t.copy_(x)
    if not recorder.samples:
        return
    mine = {key: (res.position, res.data) for key, res in recorder.reservoirs.items()}
    every: list[dict | None] = [None] * ctx.world
    dist.all_gather_object(every, mine)  # in-process tensors between our own ranks, not a file
    keys = sorted({k for part in every for k in part})  # type: ignore[union-attr]
    for key in keys:
        parts = [part[key] for part in every if key in part]  # type: ignore[operator]
        res = recorder.reservoirs.get(key)
        if res is None:
            from .reservoir import Reservoir

            res = recorder.reservoirs[key] = Reservoir(recorder.samples, 0)
        res.data = combine(parts)
        n = next(iter(res.data.values())).shape[0] if res.data else 0
        res.position = torch.arange(n)  # the combined sample is filled from slot 0 on
