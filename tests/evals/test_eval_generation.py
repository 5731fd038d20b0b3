"""Batched greedy generation equals one-prompt-at-a-time ``model.generate``."""

from __future__ import annotations

import re

import pytest
import torch
from eval_fixtures import fixture_records, tiny_moe, tiny_tokenizer, torch_threads

from moe_slim.errors import MoeSlimError
from moe_slim.evals.generation import cut_at_stops, eos_token_ids, greedy_generate

STOPS = ("<|end|>", "\n", "<|")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _reference(model, tokenizer, prompt, budget, stops, stop_regex=None):
    eos = eos_token_ids(model, tokenizer)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=budget, do_sample=False, num_beams=1)
    kept = []
    for t in out[0, enc["input_ids"].shape[1]:].tolist():
        if t in eos:
            break
        kept.append(t)
    return cut_at_stops(tokenizer.decode(kept, skip_special_tokens=False), stops, stop_regex)[0]


def test_batched_equals_one_at_a_time(tok):
    model = tiny_moe(tok, seed=3)
    recs = fixture_records(8)
    prompts = [r["prompt"] for r in recs["translation"][:14]] + [r["prompt"] for r in recs["math"][:4]]
    budgets = [3 + (7 * i) % 29 for i in range(len(prompts))]  # varied budgets and prompt lengths
    with torch_threads(1):
        batched = greedy_generate(model, tok, prompts, max_new_tokens=budgets, stop_strings=STOPS, batch_size=5)
        single = [_reference(model, tok, p, b, STOPS) for p, b in zip(prompts, budgets)]
    assert batched == single
    assert any(len(tok(s)["input_ids"]) > 5 for s in batched)  # non-trivial continuations were compared


def test_stops_and_eos(tok):
    model = tiny_moe(tok, seed=5)
    prompts = [r["prompt"] for r in fixture_records(4)["translation"]]
    with torch_threads(1):
        free = greedy_generate(model, tok, prompts, max_new_tokens=24, stop_strings=(), batch_size=4)
        stopped = greedy_generate(model, tok, prompts, max_new_tokens=24, stop_strings=STOPS, batch_size=3)
        rx = re.compile(r"e")
        by_regex = greedy_generate(model, tok, prompts, max_new_tokens=24, stop_strings=(), stop_regex=rx)
    for f, s, r in zip(free, stopped, by_regex):
        assert f.startswith(s) and not any(x in s for x in STOPS)
        assert f.startswith(r) and ("e" not in r[:-1]) and (r.endswith("e") or r == f)


def test_encoder_decoder_batched_equals_single(tok):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                   decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)
    prompts = [r["prompt"] for r in fixture_records(3)["translation"]]
    with torch_threads(1):
        batched = greedy_generate(model, tok, prompts, max_new_tokens=12, stop_strings=STOPS, batch_size=4)
        single = greedy_generate(model, tok, prompts, max_new_tokens=12, stop_strings=STOPS, batch_size=1)
    assert batched == single


def test_bad_arguments(tok):
    model = tiny_moe(tok)
    assert greedy_generate(model, tok, []) == []
    with pytest.raises(MoeSlimError):
        greedy_generate(model, tok, ["a", "b"], max_new_tokens=[1])
    with pytest.raises(MoeSlimError):
        greedy_generate(model, tok, ["a"], batch_size=0)
