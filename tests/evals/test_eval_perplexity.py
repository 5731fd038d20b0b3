"""Perplexity is token-weighted and independent of batching/padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import fixture_records, tiny_moe, tiny_tokenizer, torch_threads

from moe_slim.errors import MoeSlimError
from moe_slim.evals.perplexity import evaluate_perplexity, windows_of


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    return tok, tiny_moe(tok, seed=1)


def _direct(model, tok, texts, seq_len):
    """Sum of NLL and token count, one window at a time with no padding at all."""
    nll, n = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        for start in range(0, len(ids), seq_len):
            w = torch.tensor([ids[start:start + seq_len]])
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                logits = model(w).logits[0, :-1].float()
            nll += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return nll, n


def test_token_weighted_against_direct_computation(setup):
    tok, model = setup
    recs = fixture_records(6)
    docs = {"general": [r["text"] for r in recs["general"]], "code": [r["text"] for r in recs["code"]]}
    with torch_threads(1):
        out = evaluate_perplexity(model, tok, docs, seq_len=24, batch_size=4)
        nll_g, n_g = _direct(model, tok, docs["general"], 24)
        nll_c, n_c = _direct(model, tok, docs["code"], 24)
    g = out["domains"]["general"]
    assert g["tokens"] == n_g and g["nll_sum"] == pytest.approx(nll_g, rel=1e-5)
    assert g["ppl"] == pytest.approx(math.exp(nll_g / n_g), rel=1e-5)
    # overall is weighted by tokens, not an average of the domain perplexities
    assert out["overall"]["tokens"] == n_g + n_c
    assert out["overall"]["ppl"] == pytest.approx(math.exp((nll_g + nll_c) / (n_g + n_c)), rel=1e-5)
    assert out["overall"]["ppl"] != pytest.approx((g["ppl"] + out["domains"]["code"]["ppl"]) / 2, rel=1e-3)


def test_padding_does_not_change_it(setup):
    tok, model = setup
    docs = {"general": [r["text"][: 20 + 15 * i] for i, r in enumerate(fixture_records(6)["general"])]}
    with torch_threads(1):
        one = evaluate_perplexity(model, tok, docs, seq_len=64, batch_size=1)["domains"]["general"]
        padded = evaluate_perplexity(model, tok, docs, seq_len=64, batch_size=6)["domains"]["general"]
    assert one["tokens"] == padded["tokens"]
    assert padded["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-5)


def test_windows_and_errors(setup):
    tok, model = setup
    assert windows_of(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows_of(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a lone token predicts nothing
    with pytest.raises(MoeSlimError):
        evaluate_perplexity(model, tok, {"general": ["x y"]}, seq_len=1)
