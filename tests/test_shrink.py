"""Tiny configs from transformers' defaults: per-layer fields are known from the config class, every kind
of layer is kept, per-layer differences survive the shrink, and the config is the one a checkpoint reloads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_slim.families import REFUSED
from moe_slim.families.catalog import moe_model_types
from moe_slim.modeling.per_layer import config_dict, cut_layers, kept_layers, per_layer_lists
from moe_slim.modeling.tiny import TINY_CONFIGS, save_tiny, shrunk_config, tiny_model

SHRUNK = [mt for mt in moe_model_types() if mt not in TINY_CONFIGS and mt not in REFUSED]


def test_per_layer_lists_are_the_ones_the_class_sizes_by_depth() -> None:
    dots3 = config_dict(AutoConfig.for_model("dots3_note_text"))
    depth = dots3["num_hidden_layers"]
    assert set(per_layer_lists("dots3_note_text", dots3, depth)) == {"layer_types", "mlp_layer_types"}
    llama4 = config_dict(AutoConfig.for_model("llama4_text"))
    assert {"layer_types", "moe_layers", "no_rope_layers"} <= set(per_layer_lists("llama4_text", llama4, 48))
    # a list of layer indices that happens to be as long as the stack is not one value per layer
    qwen = config_dict(AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[0, 1]))
    assert per_layer_lists("qwen3_moe", qwen, 2) == []


def test_kept_layers_trade_repeated_kinds_for_lost_ones() -> None:
    assert kept_layers(list("AAAABAC"), 4) == [0, 1, 6, 4]
    assert kept_layers(list("ABCDE"), 4) == [0, 1, 2, 3]  # nothing repeated to trade: the first n
    assert kept_layers(list("AB"), 4) == [0, 1]


def test_cut_layers_keeps_each_layers_own_combination_and_renumbers_index_lists() -> None:
    d = {"layer_types": list("lllllf"), "mlp_layer_types": ["dense"] + ["sparse"] * 5, "moe_layers": [1, 5],
         "per_layer_config": {"05": {"num_attention_heads": 2}}}
    cut, overrides = cut_layers(d, ["layer_types", "mlp_layer_types", "moe_layers"], 6, 3)
    assert cut == {"layer_types": list("llf"), "mlp_layer_types": ["dense", "sparse", "sparse"], "moe_layers": [1, 2]}
    assert overrides == {2: {"num_attention_heads": 2}}


def test_dots3s_per_layer_attention_survives_the_shrink_and_a_reload(tmp_path: Path) -> None:
    config = shrunk_config("dots3_note")
    assert config.layer_types == ["indexed_attention", "indexed_attention", "sliding_attention", "sliding_attention"]
    assert config.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]
    indexed, sliding = config.per_layer_config[0], config.per_layer_config[2]
    # as in the released config: the sliding layers have fewer heads and wider latents than the indexed ones
    assert sliding.num_attention_heads < indexed.num_attention_heads and sliding.kv_lora_rank > indexed.kv_lora_rank
    assert sliding.qk_nope_head_dim > indexed.qk_nope_head_dim
    path = save_tiny("dots3_note", tmp_path / "dots3")
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    shapes = [layer.self_attn.kv_b_proj.weight.shape for layer in model.model.layers]
    assert shapes[0] == shapes[1] != shapes[2] == shapes[3]
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model("dots3_note")(ids).logits)


@pytest.mark.parametrize("model_type", SHRUNK)
def test_a_shrunk_config_is_the_one_its_checkpoint_reloads(model_type: str) -> None:
    config = shrunk_config(model_type)
    d = config_dict(config)
    assert config_dict(type(config).from_dict(copy.deepcopy(d))) == d  # from_dict pops keys of nested dicts
