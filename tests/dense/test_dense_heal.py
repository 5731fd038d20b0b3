"""Healing after layer removal: distillation brings the slimmed model closer to the original; slim-dense
--heal writes a healed checkpoint with a model card."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from moe_slim.cli import main
from moe_slim.dense.heal import distill_loss, heal
from moe_slim.dense.slim import make_plan, slim_model
from moe_slim.dense.tiny import WORDS, save_tiny, tiny_model, toy_tokenizer
from moe_slim.recover.data import collate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal_data")
    rng = random.Random(0)
    (root / "general").mkdir()
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(20))}) for _ in range(40)]
    (root / "general" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _fixed_batch(tok):
    rng = random.Random(9)
    exs = [tok(" ".join(rng.choice(WORDS) for _ in range(16)), add_special_tokens=False)["input_ids"] for _ in range(8)]
    return collate([(e, e) for e in exs], tok.pad_token_id)


@pytest.mark.parametrize("model_type, keep", [("llama", {"decoder": [0, 1, 5]}), ("bert", {"encoder": [0, 3]})])
def test_distillation_moves_the_slimmed_model_towards_the_original(model_type, keep, data_dir):
    # a large init so that the removed layers matter (a default-initialised tiny BERT is nearly the identity)
    teacher = tiny_model(model_type, seed=2, initializer_range=0.2).eval()
    student = slim_model(copy.deepcopy(teacher), keep)
    tok = toy_tokenizer()
    batch = _fixed_batch(tok)
    causal = model_type == "llama"
    with torch.no_grad():
        before = float(distill_loss(student, teacher, batch, causal))
    embed_before = student.get_input_embeddings().weight.detach().clone()
    info = heal(student, tok, 30, teacher=teacher, data="general=1", data_dir=data_dir, lr=3e-3, batch_size=4,
                seq_len=24)
    with torch.no_grad():
        after = float(distill_loss(student, teacher, batch, causal))
    assert after < 0.8 * before, (before, after)
    assert info["steps"] == 30 and info["mode"] == "distill" and info["tokens"] > 0
    # only the layers (and the final norm) train; the embeddings are the original's
    assert torch.equal(student.get_input_embeddings().weight, embed_before)
    assert all(p.requires_grad for p in student.parameters())


def test_slim_dense_heals_and_writes_a_card(data_dir, tmp_path):
    model = tiny_model("llama", seed=2)
    src = save_tiny(model, tmp_path / "model")
    plan = make_plan(model, {"decoder": [0, 1, 2]}, method="probscale-contiguous", source=str(src),
                     budget={"spec": "x2", "params": 100, "achieved_params": 90, "achieved_reduction": 2.0},
                     measured={"retention": 0.93, "tasks": {}})
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "slim"
    assert main(["slim-dense", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(out), "--heal", "4",
                 "--data", str(data_dir)]) == 0
    info = json.loads((out / "slim.json").read_text())
    assert info["heal"]["steps"] == 4 and info["heal"]["mode"] == "distill"
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "layer-pruning" in card
    assert "| decoder | 6 | [0, 1, 2] | [3, 4, 5] |" in card
    assert "distill for 4 steps" in card and "0.930" in card
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    # without --heal: the kept layers are the original's, and the card says there was no healing
    assert main(["slim-dense", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "raw")]) == 0
    assert "none (run" in (tmp_path / "raw" / "README.md").read_text()


def test_sft_healing_goes_through_recover(data_dir):
    model = slim_model(tiny_model("llama", seed=2), {"decoder": [0, 5]})
    info = heal(model, toy_tokenizer(), 2, mode="sft", data="general=1", data_dir=data_dir, batch_size=2, seq_len=16)
    assert info["mode"] == "sft" and info["steps"] == 2 and info["tokens"] > 0
