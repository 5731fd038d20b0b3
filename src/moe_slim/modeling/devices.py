"""Where and in what precision a command runs its model: ``--device`` and ``--dtype``.

Defaults: with a GPU, the GPU in the checkpoint's dtype; on a CPU, float32 (bf16/fp16 run slowly
and less exactly there). Statistics are accumulated in float64 whatever the compute dtype.
"""

from __future__ import annotations

import os

import torch

from ..errors import MoeSlimError
from .loading import parse_dtype


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``; one-line errors for others."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise MoeSlimError(f"unknown device '{spec}' (choose from: auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoeSlimError(f"device '{spec}' was asked for but this machine has no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MoeSlimError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise MoeSlimError(f"device '{spec}' is not supported (choose from: auto, cpu, cuda, cuda:N)")
    return device


def compute_dtype(spec: str | torch.dtype | None, device: torch.device, source: str | os.PathLike | None = None
                  ) -> torch.dtype:
    """The dtype to run in: the one asked for, else the checkpoint's on a GPU and float32 on a CPU."""
    dtype = parse_dtype(spec)
    if dtype is None:
        if device.type == "cpu":
            dtype = torch.float32
        else:
            from .shards import source_dtype

            dtype = (source_dtype(source) if source is not None else None) or torch.bfloat16
    check_runs(device, dtype)
    return dtype


def check_runs(device: torch.device, dtype: torch.dtype) -> None:
    """A one-line error when ``device`` cannot compute in ``dtype`` (e.g. bf16 on a GPU without it)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise MoeSlimError(f"GPU {torch.cuda.get_device_name(device)} cannot compute in bfloat16; use --dtype float16 "
                           "or float32")
    try:
        x = torch.ones(4, 4, device=device, dtype=dtype)
        (x @ x).softmax(-1)
    except RuntimeError as exc:
        raise MoeSlimError(f"device {device} cannot compute in {str(dtype).removeprefix('torch.')} "
                           f"({str(exc).splitlines()[0]}); choose another --dtype") from None


def available_memory(device: torch.device) -> int:
    """Bytes free for weights on ``device`` (MemAvailable on CPUs)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
