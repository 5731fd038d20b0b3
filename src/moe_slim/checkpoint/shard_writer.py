"""Writing safetensors shards whose tensors stream in, without holding a shard in memory.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. A rewrite knows
every output tensor's name, dtype and shape before it reads a byte (that is its plan), so it can
write each shard's header first and then append the tensors' bytes as they are produced: resident
memory stays at one chunk. The files are standard safetensors (8-byte little-endian header length,
JSON header padded to 8 bytes, then the data; the format's specification in the safetensors
repository), read back by the safetensors library in the tests. Shards follow transformers'
naming (``model-00001-of-00003.safetensors`` plus ``model.safetensors.index.json``, or a single
``model.safetensors``), each file is fsynced, and the same input always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MoeSlimError
from ..modeling.shards import INDEX_FILE, ITEMSIZE, SINGLE_FILE
from ..outputs import pause_point

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


@dataclass
class OutTensor:
    """One output tensor: its name, dtype string, shape, and a producer of exactly its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def parse_size(text: str | int) -> int:
    """``"300MB"`` / ``"5GB"`` / ``"2GiB"`` / ``1000000`` -> bytes (transformers' max_shard_size forms)."""
    if isinstance(text, int):
        size = text
    else:
        t = str(text).strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        for unit, mult in units.items():
            if t.endswith(unit):
                t, factor = t[: -len(unit)], mult
                break
        else:
            factor = 1
        try:
            size = int(float(t) * factor)
        except ValueError:
            raise MoeSlimError(f"'{text}' is not a size (write e.g. 300MB, 5GB or 2GiB)") from None
    if size <= 0:
        raise MoeSlimError(f"a shard size must be positive, not '{text}'")
    return size


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Tensors in order, cut into shards of at most ``max_bytes`` (a larger tensor gets its own shard)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s] or [[]]


def _header(shard: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_shards(
    directory: str | os.PathLike,
    tensors: list[OutTensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write ``tensors`` (in order) as safetensors shards in ``directory``; return the weight map."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise MoeSlimError("internal error: two output tensors share a name")
    meta = {"format": "pt", **(metadata or {})}
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        path = Path(directory) / fname
        with path.open("wb") as f:
            f.write(_header(shard, meta))
            for t in shard:
                written = 0
                for data in t.chunks():
                    f.write(data)
                    written += len(data)
                    if on_bytes is not None:
                        on_bytes(len(data))
                if written != t.nbytes:
                    raise MoeSlimError(f"internal error: tensor {t.name} produced {written} bytes, expected {t.nbytes}")
                weight_map[t.name] = fname
            f.flush()
            os.fsync(f.fileno())
        pause_point("after-first-file")
    if n > 1:
        total = sum(t.nbytes for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _fsync_write(Path(directory) / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return weight_map
