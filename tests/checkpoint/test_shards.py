"""Shards written tensor by tensor read back through the safetensors library; rows read by byte ranges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_slim.checkpoint.shard_writer import OutTensor, parse_size, write_shards
from moe_slim.errors import MoeSlimError
from moe_slim.modeling.shards import SAFETENSORS_DTYPES, ShardedCheckpoint

TENSORS = {
    "a.weight": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).bfloat16(),
    "b.fp8": torch.randn(4, 3, generator=torch.Generator().manual_seed(1)).to(torch.float8_e4m3fn),
    "c.blocks": torch.randint(0, 256, (8, 2, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)),
    "d.scalar": torch.tensor(3.5),
    "e.empty": torch.zeros(0, 4),
    "f.int": torch.arange(10, dtype=torch.int64),
}


def _out(name: str, t: torch.Tensor) -> OutTensor:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return OutTensor(name, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape), lambda: [data[:7], data[7:]])


@pytest.mark.parametrize("max_bytes", [10**9, 100])
def test_streamed_shards_read_back_through_safetensors(tmp_path: Path, max_bytes: int) -> None:
    wmap = write_shards(tmp_path, [_out(k, t) for k, t in TENSORS.items()], max_shard_bytes=max_bytes)
    files = sorted(set(wmap.values()))
    assert (len(files) == 1) == (max_bytes == 10**9)
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == wmap
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    for name, t in TENSORS.items():
        with safe_open(str(tmp_path / wmap[name]), "pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got,
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)


def test_reader_rows_equal_library_slices(tmp_path: Path) -> None:
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    ck = ShardedCheckpoint(tmp_path)
    assert torch.equal(ck.tensor("a.weight", rows=[4, 1]), TENSORS["a.weight"][[4, 1]])
    assert torch.equal(ck.tensor("c.blocks", rows=[7, 0, 3]), TENSORS["c.blocks"][[7, 0, 3]])
    assert torch.equal(ck.tensor("f.int"), TENSORS["f.int"])
    assert ck.dominant_float_dtype() == torch.bfloat16


def test_writer_refuses_a_producer_of_the_wrong_length(tmp_path: Path) -> None:
    bad = OutTensor("x", "F32", (2,), lambda: [b"\0" * 4])
    with pytest.raises(MoeSlimError, match="produced 4 bytes, expected 8"):
        write_shards(tmp_path, [bad])


def test_sizes_parse_like_transformers() -> None:
    assert parse_size("300MB") == 300 * 10**6 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    with pytest.raises(MoeSlimError, match="not a size"):
        parse_size("big")
