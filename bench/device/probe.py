"""Run one ``moe-slim`` command in this process and write its wall time and peak GPU memory to a JSON file.

The device check starts it under ``torchrun`` (a launcher's process cannot be measured from outside):

    torchrun --nproc-per-node 1 bench/device/probe.py FIGURES.json [--one-rank-group] observe MODEL ...

``--one-rank-group`` sends a single process through the data-parallel code path (process group,
all-reduce of the sums, gathering of the merge samples), which the command skips for one process:
one GPU cannot hold two NCCL ranks, so this is how a one-GPU machine runs moe_slim's NCCL code.
The process group is still started by moe_slim itself, with the backend it chooses.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _one_rank_group() -> None:
    """Let moe_slim's context() start a process group for one process (its gate asks WORLD_SIZE > 1)."""
    import torch.distributed as dist

    real_init = dist.init_process_group

    def init(*args, **kwargs):
        os.environ["WORLD_SIZE"] = "1"  # the group itself has the launcher's one rank
        return real_init(*args, **kwargs)

    dist.init_process_group = init
    os.environ["WORLD_SIZE"] = "2"


def main(argv: list[str]) -> int:
    out, argv = argv[0], argv[1:]
    forced = argv[:1] == ["--one-rank-group"]
    if forced:
        argv = argv[1:]
        _one_rank_group()
    import torch

    from moe_slim.cli import main as moe_slim

    t0 = time.perf_counter()
    rc = moe_slim(argv)
    figures = {"rc": rc, "wall_s": time.perf_counter() - t0, "peak_gpu_mib": None, "backend": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        figures["backend"] = str(dist.get_backend())
        figures["world"] = dist.get_world_size()
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(figures, f)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
