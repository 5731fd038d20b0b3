"""Layer removal: every family's slimmed checkpoint reloads through the auto class with the kept
layers' weights unchanged, runs, and (decoders) generates; config per-layer entries are re-mapped."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
)

from moe_slim.cli import main
from moe_slim.dense.family import stack_layers
from moe_slim.dense.slim import make_plan, save_slimmed, slim_model
from moe_slim.dense.tiny import save_tiny, tiny_model, toy_tokenizer
from moe_slim.errors import MoeSlimError

CASES = {
    "llama": ({"decoder": [0, 2, 5]}, AutoModelForCausalLM),
    "qwen2": ({"decoder": [1, 3]}, AutoModelForCausalLM),
    "qwen3_moe": ({"decoder": [0, 1, 3]}, AutoModelForCausalLM),
    "bert": ({"encoder": [1, 3]}, AutoModelForMaskedLM),
    "t5": ({"encoder": [1, 2], "decoder": [0, 2]}, AutoModelForSeq2SeqLM),
}


def _layer_states(model):
    return {s: [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in layers]
            for s, layers in stack_layers(model).items()}


@pytest.mark.parametrize("model_type", list(CASES))
def test_slimmed_checkpoint_reloads_with_original_weights(model_type, tmp_path):
    keep, auto = CASES[model_type]
    model = tiny_model(model_type)
    before = _layer_states(model)
    ids = torch.tensor([[5, 9, 14, 22, 7, 31]])
    slim_model(model, keep)
    out = save_slimmed(model, toy_tokenizer(), tmp_path / "slim", provenance={"keep": keep})
    reloaded = auto.from_pretrained(str(out)).eval()
    assert json.loads((out / "slim.json").read_text())["keep"] == keep
    for stack, layers in stack_layers(reloaded).items():
        assert len(layers) == len(keep[stack])
        for j, i in enumerate(keep[stack]):
            state = layers[j].state_dict()
            for name, tensor in before[stack][i].items():
                assert torch.equal(state[name], tensor), (stack, j, name)
            for m in layers[j].modules():  # the KV cache is indexed by layer_idx
                if isinstance(getattr(m, "layer_idx", None), int):
                    assert m.layer_idx == j
    with torch.no_grad():
        if model_type == "t5":
            a = model(input_ids=ids, decoder_input_ids=ids).logits
            b = reloaded(input_ids=ids, decoder_input_ids=ids).logits
        else:
            a, b = model(ids).logits, reloaded(ids).logits
    assert torch.isfinite(b).all() and torch.allclose(a, b, atol=1e-5)
    if model_type != "bert":
        gen = reloaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        ref = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        assert torch.equal(gen, ref)
        if model_type != "t5":  # cached and uncached decoding agree -> layer_idx / cache layout are right
            nocache = reloaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
            assert torch.equal(gen, nocache)


def test_config_per_layer_entries_are_remapped():
    qwen = tiny_model("qwen2", layer_types=["full_attention", "sliding_attention"] * 2, use_sliding_window=True,
                      sliding_window=8, max_window_layers=2)
    slim_model(qwen, {"decoder": [0, 1, 3]})
    assert qwen.config.num_hidden_layers == 3
    assert qwen.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert qwen.config.max_window_layers == 2
    # Qwen3-MoE with a sparse step: the layout is written out explicitly so reloading rebuilds it
    moe = tiny_model("qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[])
    kinds = [type(layer.mlp).__name__ for layer in moe.model.layers]
    slim_model(moe, {"decoder": [0, 1, 3]})
    assert moe.config.decoder_sparse_step == 1
    assert moe.config.mlp_only_layers == [0]
    assert [type(layer.mlp).__name__ for layer in moe.model.layers] == [kinds[0], kinds[1], kinds[3]]


def test_t5_first_layer_bias_moves_to_the_new_first_layer():
    model = tiny_model("t5")
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.clone()
    slim_model(model, {"encoder": [2]})
    attn = model.encoder.block[0].layer[0].SelfAttention
    assert attn.has_relative_attention_bias and torch.equal(attn.relative_attention_bias.weight, bias)
    assert model.config.num_layers == 1 and model.encoder.config.num_layers == 1


def test_more_families_round_trip(tmp_path):
    from transformers import AutoConfig

    from moe_slim.dense.tiny import _DEC
    from moe_slim.modeling.tiny import tiny_config

    cases = [
        (AutoConfig.for_model("gemma2", **{**_DEC, "num_hidden_layers": 3, "head_dim": 8}), [0, 2]),
        (AutoConfig.for_model("mixtral", **{**_DEC, "num_hidden_layers": 3, "num_local_experts": 4,
                                            "num_experts_per_tok": 2}), [0, 2]),
        (AutoConfig.for_model("qwen3", **{**_DEC, "num_hidden_layers": 3, "head_dim": 8}), [1, 2]),
        (tiny_config("deepseek_v3"), [1, 2]),  # first_k_dense_replace=1: the dense layer 0 goes
        (AutoConfig.for_model("roberta", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=40, pad_token_id=1), [0, 2]),
    ]
    for cfg, keep in cases:
        mt = cfg.model_type
        auto = AutoModelForMaskedLM if mt == "roberta" else AutoModelForCausalLM
        torch.manual_seed(0)
        model = auto.from_config(cfg).eval()
        stack = "encoder" if mt == "roberta" else "decoder"
        before = _layer_states(model)[stack]
        slim_model(model, {stack: keep})
        save_slimmed(model, None, tmp_path / mt)
        reloaded = auto.from_pretrained(str(tmp_path / mt)).eval()
        for j, i in enumerate(keep):
            state = stack_layers(reloaded)[stack][j].state_dict()
            assert all(torch.equal(state[k], v) for k, v in before[i].items()), (mt, j)
        ids = torch.tensor([[4, 5, 6]])
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5), mt
        if mt == "deepseek_v3":
            assert reloaded.config.first_k_dense_replace == 0
        if mt != "roberta":
            assert reloaded.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_unknown_family_is_a_one_line_error(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1))
    with pytest.raises(MoeSlimError, match="supported: .*llama.*t5"):
        slim_model(model, {"decoder": [0]})
    save_tiny(model, tmp_path / "gpt2")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moe_slim/dense-plan@1", "keep": {"decoder": [0]}}))
    rc = main(["slim-dense", str(tmp_path / "gpt2"), "--plan", str(plan), "--out", str(tmp_path / "out")])
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moe-slim:")]
    assert rc == 2 and len(errs) == 1 and "gpt2" in errs[0] and "supported" in errs[0]
    assert not (tmp_path / "out").exists()


def test_slim_dense_cli_and_bad_plans(tmp_path, capsys):
    model = tiny_model("llama")
    src = save_tiny(model, tmp_path / "model")
    plan = make_plan(model, {"decoder": [0, 1, 4]}, method="manual")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["slim-dense", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")]) == 0
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    capsys.readouterr()
    assert out.config.num_hidden_layers == 3 and out.config.moe_slim["dense_slim"]["keep"] == {"decoder": [0, 1, 4]}
    # existing output refused; bad plans are one-line errors and write nothing
    assert main(["slim-dense", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")]) == 2
    for keep in ({"decoder": [0, 9]}, {"decoder": []}, {"encoder": [0]}):
        (tmp_path / "bad.json").write_text(json.dumps({**plan, "keep": keep, "model": {}}))
        assert main(["slim-dense", str(src), "--plan", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    (tmp_path / "other.json").write_text(json.dumps({**plan, "model": {**plan["model"], "layers": {"decoder": 30}}}))
    assert main(["slim-dense", str(src), "--plan", str(tmp_path / "other.json"), "--out", str(tmp_path / "b")]) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moe-slim:")]
    assert len(errs) == 5 and not (tmp_path / "b").exists()
    assert "already exists" in errs[0] and "only 6 layers" in errs[1] and "keeps no layer" in errs[2]
    assert "stack 'encoder'" in errs[3] and "run probe on this model" in errs[4]
