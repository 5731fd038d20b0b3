"""The shipped reference MoE: loads, generates, matches its card; observe -> prune -> eval on a slice."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moe_slim.api import plan_for
from moe_slim.evaluate import evaluate
from moe_slim.fingerprint import model_fingerprint, weights_hash
from moe_slim.loading import load_model
from moe_slim.observe import observe
from moe_slim.prompts import cut_generation, translation_prompt
from moe_slim.prune import apply_plan, count_parameters
from moe_slim.reference import REFERENCE_DIR, calibration_texts, specialisation, translation_against_copy

DATA = "data"


@pytest.fixture(scope="module")
def reference():
    assert (REFERENCE_DIR / "config.json").exists(), "models/reference/ must ship the reference MoE"
    model, tok = load_model(REFERENCE_DIR)
    return model, tok


def test_reference_loads_generates_and_matches_its_card(reference) -> None:
    model, tok = reference
    card = json.loads((REFERENCE_DIR / "metrics.json").read_text())
    assert model_fingerprint(model) == card["fingerprint"]
    assert weights_hash(model) == card["weights_hash"]
    size = sum(p.stat().st_size for p in REFERENCE_DIR.iterdir() if p.is_file())
    assert size <= 40 * 2**20, f"reference model is {size / 2**20:.1f} MiB on disk"
    prompt = translation_prompt("Cannot open the file.", "de")
    ids = tok(prompt, return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    text = cut_generation(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=False))
    assert text, "the reference model should produce a translation"


def test_observe_prune_eval_on_a_slice(reference) -> None:
    model, tok = reference
    with torch.no_grad():
        stats = observe(model, tok, calibration_texts(DATA, 16), seq_len=128, batch_size=8)
    spec = specialisation(stats)
    assert spec["layers_with_quarter_specialised"] >= 1, spec
    pruned = copy.deepcopy(model)
    plan = plan_for(pruned, stats, criterion="reap", ratio=0.5, mix={"translation": 1.0})
    apply_plan(pruned, plan)
    assert count_parameters(pruned) < count_parameters(model)
    full = evaluate(model, tok, "quick", data_dir=DATA, tasks=["translation", "perplexity"], limit=8)
    half = evaluate(pruned, tok, "quick", data_dir=DATA, tasks=["translation", "perplexity"], limit=8)
    for res in (full, half):
        for pair in ("en-de", "en-fr", "en-es"):
            assert 0.0 <= res["metrics"][f"translation/{pair}/chrf"] <= 100.0
        assert res["metrics"]["perplexity/ppl"] > 1.0
    # a trained model: far below the perplexity of guessing uniformly over the vocabulary
    assert full["metrics"]["perplexity/ppl"] < len(tok) / 20
    # pruning half the experts costs perplexity but keeps a working model
    assert full["metrics"]["perplexity/ppl"] < half["metrics"]["perplexity/ppl"] < 4 * full["metrics"]["perplexity/ppl"]



def test_reference_translations_depend_on_the_source(reference) -> None:
    """Per pair, the greedy translations match their own references better than another sentence's.

    A model that only learned to write the target language (as the first reference model did) scores
    the same against shuffled references; one that translates does not. The copy-baseline
    comparison of the same function is checked for consistency.
    """
    from sacrebleu.metrics import CHRF

    model, tok = reference
    with torch.no_grad():
        res = translation_against_copy(model, tok, DATA, per_pair=40, keep_texts=True)
    assert sorted(res) == ["en-de", "en-es", "en-fr"]
    for pair, e in res.items():
        assert e["n"] == 40
        assert e["delta"] == pytest.approx(e["chrf"] - e["copy_chrf"], abs=0.02)
        hyps = [h["hyp"] for h in e["hypotheses"]]
        refs = e["references"]
        own = CHRF().corpus_score(hyps, [refs]).score
        shifted = CHRF().corpus_score(hyps, [refs[1:] + refs[:1]]).score
        assert own == pytest.approx(e["chrf"], abs=0.01)
        assert own > shifted + 3.0, (pair, own, shifted)
