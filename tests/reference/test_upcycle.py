"""Sparse upcycling: every expert starts as its layer's dense FFN, so the MoE computes what the dense model did."""

from __future__ import annotations

from dataclasses import replace

import torch
from eval_fixtures import tiny_tokenizer

from moe_slim.reference.recipe import Recipe, build_model, upcycle

TINY = replace(Recipe(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               head_dim=16, moe_intermediate_size=8, num_experts=6, num_experts_per_tok=3)


def test_upcycled_moe_equals_the_dense_model_without_noise_and_differs_with_it(one_torch_thread):
    tok = tiny_tokenizer()
    dense = build_model(TINY, tok, dense=True).eval()
    assert all(not hasattr(layer.mlp, "experts") for layer in dense.model.layers)
    ids = tok("The cat sees a red house, says the teacher.", return_tensors="pt").input_ids
    exact = upcycle(dense, replace(TINY, upcycle_noise=0.0), tok).eval()
    assert exact.config.num_experts == 6 and exact.config.num_experts_per_tok == 3
    layer = exact.model.layers[1].mlp.experts
    d = dense.model.layers[1].mlp
    for e in range(6):
        assert torch.equal(layer.gate_up_proj[e], torch.cat([d.gate_proj.weight, d.up_proj.weight]))
        assert torch.equal(layer.down_proj[e], d.down_proj.weight)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        torch.testing.assert_close(exact(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
        noisy = upcycle(dense, TINY, tok).eval()
        experts = noisy.model.layers[0].mlp.experts.gate_up_proj
        assert not torch.equal(experts[0], experts[1])   # the noise breaks the symmetry between experts
        assert not torch.allclose(noisy(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
    again = upcycle(dense, TINY, tok)
    assert torch.equal(again.model.layers[0].mlp.experts.gate_up_proj, experts)   # seeded
