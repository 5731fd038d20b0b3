"""Merging at size (one MoE layer's weights in memory at a time, read from the shards; sequential
merging on the layer-wise path) decides the same plan and writes the same tensors as merging the
loaded model, on every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_slim.api import merge_checkpoint
from moe_slim.modeling.shards import ShardedCheckpoint
from moe_slim.modeling.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = {
    "general": ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, they said"],
    "code": ["def f(x):\n    return x * 2", "for i in range(10): print(i)"],
}


def _source(model_type: str, path: Path) -> Path:
    tiny_model(model_type, seed=1).to(torch.bfloat16).save_pretrained(str(path), max_shard_size="30KB")
    tiny_tokenizer().save_pretrained(str(path))
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = ShardedCheckpoint(path)
    return {k: ckpt.tensor(k) for k in ckpt.keys}


def _plan(path: Path) -> list[dict]:
    return [{k: l[k] for k in ("keep", "groups", "weights", "permutations_sha256")}
            for l in json.loads((path / "plan.json").read_text())["layers"]]


def _same(a: Path, b: Path) -> None:
    assert _plan(a) == _plan(b)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
        assert ta[k].dtype == torch.bfloat16 or not ta[k].is_floating_point(), k  # V4's token tables: int64


@pytest.mark.parametrize("model_type", [*TINY_FAMILIES, "deepseek_v4", "longcat_flash"])
def test_sequential_merge_at_size_equals_in_memory(model_type: str, tmp_path: Path) -> None:
    src = _source(model_type, tmp_path / "src")
    kw = dict(method="ream", ratio=0.5, calib=TEXTS, sequential=True, seq_len=32, batch_size=2, max_tokens=256,
              align_tokens=64, device="cpu")
    merge_checkpoint(src, tmp_path / "at_size", **kw)
    merge_checkpoint(src, tmp_path / "memory", in_memory=True, **kw)
    assert json.loads((tmp_path / "at_size" / "plan.json").read_text())["info"]["at_size"] is True
    _same(tmp_path / "at_size", tmp_path / "memory")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "nllb-moe", "dbrx"])
@pytest.mark.parametrize("method", ["hc-smoe", "m-smoe"])
def test_merge_at_size_from_observed_samples_equals_in_memory(model_type: str, method: str, tmp_path: Path) -> None:
    src = _source(model_type, tmp_path / "src")
    kw = dict(method=method, ratio=0.5, calib=TEXTS, seq_len=32, batch_size=2, max_tokens=256, device="cpu")
    merge_checkpoint(src, tmp_path / "at_size", **kw)
    merge_checkpoint(src, tmp_path / "memory", in_memory=True, **kw)
    _same(tmp_path / "at_size", tmp_path / "memory")


def test_layer_loaded_in_source_dtype_only_when_written_in_it(tmp_path: Path) -> None:
    """A bf16 layer merged for a bf16 output is loaded in bf16 (half the memory, same bytes: the sums are
    float32 and rounded once); for a float32 output it is loaded in float32, or the rounding would differ."""
    from moe_slim.experts.merge.at_size import MergedLayers
    from moe_slim.api.plans import load_plan
    from moe_slim.modeling.loading import load_config

    src = _source("qwen3_moe", tmp_path / "src")
    kw = dict(method="hc-smoe", ratio=0.5, calib=TEXTS, seq_len=32, batch_size=2, max_tokens=256, device="cpu")
    merge_checkpoint(src, tmp_path / "at_size", dtype="float32", **kw)
    merge_checkpoint(src, tmp_path / "memory", dtype="float32", in_memory=True, **kw)
    ta, tb = _tensors(tmp_path / "at_size"), _tensors(tmp_path / "memory")
    assert ta.keys() == tb.keys()
    assert all(ta[k].dtype == tb[k].dtype == torch.float32 and torch.equal(ta[k], tb[k]) for k in ta)
    plan = load_plan(tmp_path / "at_size" / "plan.json")
    config = load_config(src)
    assert MergedLayers(src, config, plan).load_dtype(0) == torch.bfloat16
    assert MergedLayers(src, config, plan, torch.bfloat16).load_dtype(0) == torch.bfloat16
    assert MergedLayers(src, config, plan, torch.float32).load_dtype(0) == torch.float32
