"""Reading a safetensors checkpoint on disk tensor by tensor, and row by row, without loading it.

A checkpoint directory holds ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Only the JSON headers are read up front: for every tensor its
file, dtype string, shape and absolute byte range. A tensor's rows along its first dimension are
contiguous byte ranges, so slicing the expert dimension of a fused ``[E, ...]`` tensor (any dtype,
quantized blocks and scales included) is copying byte ranges: nothing is dequantized or converted.

Files are read with ordinary buffered reads into small buffers rather than memory-mapped, so the
process's resident memory stays at the buffer size however large the checkpoint is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoeSlimError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header

#: bytes per element of every safetensors dtype string, and the torch dtype where torch has one
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
FLOATING = ("F16", "BF16", "F32", "F64")
CHUNK_BYTES = 16 * 2**20  # read/copy granularity


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype string, shape and absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of the first dimension (a whole scalar for 0-d tensors)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    def byte_ranges(self, rows: list[int] | None = None) -> list[tuple[int, int]]:
        """The file byte ranges of the whole tensor, or of the given first-dimension ``rows`` in that order."""
        if rows is None:
            return [(self.start, self.end)]
        out: list[tuple[int, int]] = []
        for r in rows:  # consecutive rows read as one range (a flat expert's block of rows: one seek)
            a = self.start + r * self.row_bytes
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], a + self.row_bytes)
            else:
                out.append((a, a + self.row_bytes))
        return out


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file and its ``__metadata__``; one-line errors if it is corrupt."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoeSlimError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise MoeSlimError(f"{path} is truncated or not a safetensors file (header of {n} bytes, "
                                   f"file of {size})")
            raw = f.read(n)
    except OSError as exc:
        raise MoeSlimError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoeSlimError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise MoeSlimError(f"{path} has a corrupt safetensors header")
    meta = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    base = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MoeSlimError(f"{path}: tensor {name} has a malformed header entry") from None
        if dtype not in ITEMSIZE:
            raise MoeSlimError(f"{path}: tensor {name} has dtype {dtype}, which moe_slim does not know")
        if e - b != math.prod(shape) * ITEMSIZE[dtype] or b < 0:
            raise MoeSlimError(f"{path}: tensor {name} has {e - b} bytes for shape {list(shape)} of {dtype}")
        if base + e > size:
            raise MoeSlimError(f"{path} is truncated: tensor {name} ends at byte {base + e}, the file has {size}")
        entries[name] = TensorEntry(name, path, dtype, shape, base + b, base + e)
    return entries, {str(k): str(v) for k, v in meta.items()}


class ShardedCheckpoint:
    """The safetensors tensors of a checkpoint directory, read lazily.

    ``keys`` are in file order (shards in index order, tensors by offset), so reading them in that
    order reads every file front to back once.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.index_file: Path | None = None
        files = self._files()
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            entries, meta = read_header(f)
            for name, entry in entries.items():
                if name in self.entries:
                    raise MoeSlimError(f"tensor {name} is stored twice ({self.entries[name].file.name} and {f.name})")
                self.entries[name] = entry
            self.metadata.update(meta)
        if self.index_file is not None:
            self._check_index(files)
        self.keys: list[str] = sorted(self.entries, key=lambda k: (files.index(self.entries[k].file),
                                                                   self.entries[k].start))

    def _files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            self.index_file = index
            try:
                self._weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(self._weight_map, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError):
                raise MoeSlimError(f"{index} is not a valid safetensors index (no weight_map)") from None
            names = list(dict.fromkeys(self._weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise MoeSlimError(f"shard {missing[0]} listed in {index.name} is missing from {self.path}")
            return [self.path / n for n in names]
        single = self.path / SINGLE_FILE
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if found:
            raise MoeSlimError(f"{self.path} has several .safetensors files but no {INDEX_FILE}")
        raise MoeSlimError(f"{self.path} has no safetensors weights (model.safetensors or {INDEX_FILE}); "
                           "convert the checkpoint to safetensors first")

    def _check_index(self, files: list[Path]) -> None:
        for name, shard in self._weight_map.items():
            entry = self.entries.get(name)
            if entry is None:
                raise MoeSlimError(f"{INDEX_FILE} lists tensor {name} in {shard}, which does not hold it")
            if entry.file.name != shard:
                raise MoeSlimError(f"{INDEX_FILE} lists tensor {name} in {shard}, but it is in {entry.file.name}")
        extra = set(self.entries) - set(self._weight_map)
        if extra:
            raise MoeSlimError(f"tensor {sorted(extra)[0]} is in a shard but not in {INDEX_FILE}")

    # -- reading -----------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def entry(self, key: str) -> TensorEntry:
        return self.entries[key]

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def iter_bytes(self, key: str, rows: list[int] | None = None, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The bytes of ``key`` (or of the given first-dimension ``rows``, in that order), in chunks."""
        e = self.entries[key]
        with e.file.open("rb") as f:
            for a, b in e.byte_ranges(rows):
                f.seek(a)
                while a < b:
                    data = f.read(min(chunk, b - a))
                    if not data:
                        raise MoeSlimError(f"{e.file} ended while reading tensor {key} (truncated file)")
                    a += len(data)
                    yield data

    def tensor(self, key: str, rows: list[int] | None = None) -> torch.Tensor:
        """``key`` as a torch tensor (a copy), optionally only the given first-dimension rows.

        The bytes are read straight into the tensor's own memory: one copy of the tensor is held,
        not the chunks, their join and a buffer besides (three times a 1 GB embedding)."""
        e = self.entries[key]
        if e.dtype not in TORCH_DTYPES:
            raise MoeSlimError(f"tensor {key} has dtype {e.dtype}, which torch cannot hold")
        shape = e.shape if rows is None else (len(rows), *e.shape[1:])
        out = torch.empty(shape, dtype=TORCH_DTYPES[e.dtype])
        if out.numel():
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            pos = 0
            with e.file.open("rb") as f:
                for a, b in e.byte_ranges(rows):
                    f.seek(a)
                    while a < b:
                        n = f.readinto(view[pos : pos + min(CHUNK_BYTES, b - a)])
                        if not n:
                            raise MoeSlimError(f"{e.file} ended while reading tensor {key} (truncated file)")
                        a, pos = a + n, pos + n
        return out

    def float_dtypes(self) -> set[torch.dtype]:
        """The (unquantized) floating dtypes the checkpoint stores: more than one when, as in DeepSeek-V3,
        routers are kept in F32 beside bf16 weights."""
        return {TORCH_DTYPES[e.dtype] for e in self.entries.values() if e.dtype in FLOATING}

    def dominant_float_dtype(self) -> torch.dtype | None:
        """The floating dtype holding most of the weights' bytes (the checkpoint's "source dtype")."""
        sizes: dict[str, int] = {}
        for e in self.entries.values():
            if e.dtype in FLOATING:
                sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
        return TORCH_DTYPES[max(sizes, key=sizes.get)] if sizes else None


def has_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with safetensors weights (what the streaming paths need)."""
    p = Path(path)
    return p.is_dir() and ((p / INDEX_FILE).is_file() or any(p.glob("*.safetensors")))


def source_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype a checkpoint stores its weights in (None when it has no safetensors weights)."""
    return ShardedCheckpoint(path).dominant_float_dtype() if has_safetensors(path) else None


def load_dtype(requested: torch.dtype | None, path: str | os.PathLike) -> torch.dtype | None:
    """The dtype to load ``path`` in so that nothing is rounded: the one asked for, float32 when the
    checkpoint mixes floating dtypes (each tensor goes back to its own on save), else the source's."""
    if requested is not None or not has_safetensors(path):
        return requested
    ckpt = ShardedCheckpoint(path)
    return torch.float32 if len(ckpt.float_dtypes()) > 1 else ckpt.dominant_float_dtype()
