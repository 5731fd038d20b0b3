"""The shipped reference MoE: loads, generates, matches its card; observe -> prune -> eval on a slice."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from moe_slim.api import plan_for
from moe_slim.errors import MoeSlimError
from moe_slim.evals.run import evaluate
from moe_slim.experts.observe import observe
from moe_slim.experts.prune import apply_plan, count_parameters
from moe_slim.fingerprint import model_fingerprint, weights_hash
from moe_slim.modeling.loading import load_model
from moe_slim.prompts import cut_generation, translation_prompt
from moe_slim.reference.card import (
    calibration_texts,
    specialisation,
    translation_against_copy,
)
from moe_slim.reference.recipe import REFERENCE_DIR

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
    cfg = model.config  # shaped like the fine-grained MoEs users prune (GPT-OSS-20B: 32 experts, top-4)
    assert (cfg.model_type, cfg.num_hidden_layers >= 6, cfg.num_experts >= 32, cfg.num_experts_per_tok >= 4) == (
        "qwen3_moe", True, True, True)
    # the card's claim on whole catalogs never seen in training: chrF above copying the source on every pair
    for pair, e in card["splits"]["catalog_test"]["translation_vs_copy"].items():
        assert e["delta_ci95"][0] > 0, (pair, e)
    size = sum(p.stat().st_size for p in REFERENCE_DIR.iterdir() if p.is_file())
    assert size <= 60 * 10**6, f"reference model is {size / 10**6:.1f} MB on disk"
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
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


def test_target_only_stream_masks_exactly_the_source(reference) -> None:
    """With the source given, a translation text's loss targets are its target, end tag and EOS only."""
    from moe_slim.prompts import translation_text
    from moe_slim.reference.recipe import _stream

    _, tok = reference
    texts = [translation_text("Cannot open the file.", "Datei kann nicht geöffnet werden.", "de"),
             "def f(x):\n    return x"]
    ids, predict = _stream(tok, texts[:1], seed=0, source_given=True)
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    first_target = tokens.index("<|de|>") + 1
    assert not predict[:first_target].any() and predict[first_target:].all()
    assert tokens[-2:] == ["<|end|>", tok.eos_token]
    decoded_target = tok.decode(ids[first_target:-2].tolist())
    assert decoded_target == "Datei kann nicht geöffnet werden."
    # other text (no target tag) and the default: every token is a target
    for given, sample in ((True, texts[1:]), (False, texts)):
        ids, predict = _stream(tok, sample, seed=0, source_given=given)
        assert predict.all() and len(predict) == len(ids)


def test_training_loss_is_transformers_loss_without_smoothing(reference, one_torch_thread) -> None:
    """The recipe's hand-written loss reduces exactly to transformers' (LM + aux) loss; smoothing and masks change it."""
    from moe_slim.prompts import translation_text
    from moe_slim.reference.recipe import training_loss

    model, tok = reference
    model = copy.deepcopy(model).float()
    model.config.output_router_logits = True
    text = translation_text("Cannot open the file.", "Datei kann nicht geöffnet werden.", "de") + "def f(x):\n    return x"
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=ids)
        mine = training_loss(theirs, ids, 0.0, model.config.router_aux_loss_coef)
        assert float(mine) == pytest.approx(float(theirs.loss), rel=1e-6)
        smoothed = training_loss(theirs, ids, 0.1, model.config.router_aux_loss_coef)
        masked = ids.clone()
        masked[:, : ids.shape[1] // 2] = -100
        half = training_loss(theirs, masked, 0.0, model.config.router_aux_loss_coef)
    assert float(smoothed) != pytest.approx(float(mine), rel=1e-3)
    assert float(half) != pytest.approx(float(mine), rel=1e-3)


def test_train_reference_is_deterministic_and_writes_a_loadable_model(tmp_path, one_torch_thread) -> None:
    """The recipe's code path on a tiny configuration: same seed, same weights; the output loads."""
    from dataclasses import replace

    from moe_slim.reference.recipe import Recipe
    from moe_slim.reference.train import train_reference

    tiny = replace(Recipe(), vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                   seq_len=64, batch_size=2, dense_steps=2, steps=3, warmup=1, max_docs_per_domain=200,
                   target_only_loss=True)
    hashes = []
    for run in ("a", "b"):
        info = train_reference(tmp_path / run, data_dir=DATA, recipe=tiny, log_every=1)
        assert info["tokens_seen"] == (2 + 3) * 2 * 64 and len(info["log"]) == 5
        assert [e["phase"] for e in info["log"]] == ["dense"] * 2 + ["1"] * 3   # upcycled after the dense steps
        assert info["machine"]["cpu_count"] >= 1 and info["stopped_early"] is None
        assert all(math.isfinite(e["loss"]) for e in info["log"])
        model, tok = load_model(tmp_path / run)
        assert model.config.num_experts == 4 and len(tok) == 512
        hashes.append(weights_hash(model))
    assert hashes[0] == hashes[1]
    assert json.loads((tmp_path / "a" / "training.json").read_text())["recipe"]["label_smoothing"] == 0.1


def test_reference_card_is_rewritten_in_place_and_refused_early_elsewhere(tmp_path, one_torch_thread) -> None:
    """A retrained or re-measured reference model gets its card replaced (metrics.json and README.md are
    moe_slim's own files inside the marked checkpoint); a directory moe_slim did not write is refused
    before any measuring."""
    from dataclasses import replace

    from moe_slim.reference.card import write_card
    from moe_slim.reference.recipe import Recipe
    from moe_slim.reference.train import train_reference

    tiny = replace(Recipe(), vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                   seq_len=64, batch_size=2, steps=2, warmup=1, max_docs_per_domain=200)
    out = tmp_path / "ref"
    train_reference(out, data_dir=DATA, recipe=tiny, log_every=1)
    limits = {s: {"per_pair": 1, "mc_limit": 4, "ppl_docs": 1} for s in ("catalog_test", "test")}
    first = write_card(out, data_dir=DATA, calib_per_domain=2, limits=limits, log=lambda *a: None)
    (out / "README.md").write_text("stale card\n")
    second = write_card(out, data_dir=DATA, calib_per_domain=2, limits=limits, log=lambda *a: None)
    assert second["weights_hash"] == first["weights_hash"]
    assert json.loads((out / "metrics.json").read_text())["weights_hash"] == first["weights_hash"]
    assert (out / "README.md").read_text().startswith("---") and "trained from scratch" in (out / "README.md").read_text()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("not json")  # would fail differently if it were loaded
    (foreign / "metrics.json").write_text("{}")
    with pytest.raises(MoeSlimError, match="not a checkpoint moe_slim wrote"):
        write_card(foreign, data_dir=DATA, log=lambda *a: None)
    assert (foreign / "metrics.json").read_text() == "{}"
