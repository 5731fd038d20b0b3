"""Flat experts (DBRX): ``experts.mlp.w1/v1/w2`` are ``[E*I, H]`` matrices, expert ``e`` in rows
``e*I .. (e+1)*I - 1``. moe_slim views them as ``[E, I, H]``; these tests pin that view to the rows
DBRX's own forward reads, so pruning and merging touch the right experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_slim.experts.merge.apply import merge_layer
from moe_slim.experts.prune import slice_layer
from moe_slim.families import family_of, moe_layers, set_config_counts
from moe_slim.modeling.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ("mlp.w1", "mlp.v1", "mlp.w2")


def _flat(layer, name: str) -> torch.Tensor:
    return layer.experts.get_submodule(name.rpartition(".")[0]).get_parameter(name.rpartition(".")[2])


def _block(layer, name: str, e: int) -> torch.Tensor:
    size = _flat(layer, name).shape[0] // layer.num_experts
    return _flat(layer, name)[e * size : (e + 1) * size]


def test_expert_views_are_the_row_blocks_dbrx_runs() -> None:
    layer = moe_layers(tiny_model("dbrx", seed=1))[0]
    views = layer.expert_params()
    assert set(views) == set(NAMES) and all(v.shape == (8, 16, 32) for v in views.values())
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    for e in (0, 3, 7):
        assert all(torch.equal(views[n][e], _block(layer, n, e)) for n in NAMES)
        w1, v1, w2 = (_block(layer, n, e) for n in NAMES)
        want = (F.silu(x @ w1.T) * (x @ v1.T)) @ w2
        got = layer.expert_output(layer.one_expert(e), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(p.shape == (128, 32) for p in layer.experts.parameters()), "the probe never touches the module"


def test_prune_keeps_the_row_blocks_of_the_kept_experts_in_plan_order() -> None:
    layer = moe_layers(tiny_model("dbrx", seed=1))[0]
    before = {n: [_block(layer, n, e).clone() for e in range(8)] for n in NAMES}
    router = layer.router_weight.detach().clone()
    slice_layer(layer, [5, 2, 6])
    for n in NAMES:
        assert torch.equal(_flat(layer, n), torch.cat([before[n][e] for e in (5, 2, 6)]))
    assert torch.equal(layer.router_weight, router[[5, 2, 6]])
    assert layer.experts.num_experts == 3 and layer.experts.mlp.moe_num_experts == 3


def test_merge_averages_the_members_blocks() -> None:
    layer = moe_layers(tiny_model("dbrx", seed=1))[0]
    before = {n: [_block(layer, n, e).clone() for e in range(8)] for n in NAMES}
    merge_layer(layer, [[1, 4], [0, 2, 3], [5], [6, 7]], [[0.25, 0.75], [0.5, 0.25, 0.25], [1.0], [0.5, 0.5]])
    for n in NAMES:
        assert _flat(layer, n).shape == (4 * 16, 32)
        torch.testing.assert_close(_block(layer, n, 0), 0.25 * before[n][1] + 0.75 * before[n][4])
        torch.testing.assert_close(_block(layer, n, 1), 0.5 * before[n][0] + 0.25 * (before[n][2] + before[n][3]))
        assert torch.equal(_block(layer, n, 2), before[n][5])


def test_counts_are_written_into_ffn_config(tmp_path: Path) -> None:
    model = tiny_model("dbrx")
    fam = family_of(model)
    assert (fam.n_experts_key, fam.top_k_key) == ("ffn_config.moe_num_experts", "ffn_config.moe_top_k")
    set_config_counts(model.config, fam, 1)
    model.config.save_pretrained(str(tmp_path))
    ffn = json.loads((tmp_path / "config.json").read_text())["ffn_config"]
    assert (ffn["moe_num_experts"], ffn["moe_top_k"]) == (1, 1)
    assert "moe_num_experts" not in json.loads((tmp_path / "config.json").read_text())


def test_mone_compact_layout_keeps_the_kept_blocks_and_the_whole_router() -> None:
    layer = moe_layers(tiny_model("dbrx", seed=1))[0]
    before = {n: [_block(layer, n, e).clone() for e in range(8)] for n in NAMES}
    router = layer.router_weight.detach().clone()
    slice_layer(layer, [1, 3, 4], experts_only=True)
    assert all(torch.equal(_flat(layer, n), torch.cat([before[n][e] for e in (1, 3, 4)])) for n in NAMES)
    assert torch.equal(layer.router_weight, router) and layer.experts.num_experts == 8
