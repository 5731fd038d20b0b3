"""Task-specific slimming (``slim-dense --task``): baselines at equal size, the classifier keeps the
slimmed weights exactly, the checkpoint reloads as a standard text classifier with an honest card;
GGUF sources are written as bfloat16 and say so; an explicit probe budget skips the scaling sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from moe_slim.cli import main
from moe_slim.dense.baselines import evenly_spaced_selection, keep_last_selection
from moe_slim.dense.classify import set_trainable, to_classifier
from moe_slim.dense.slim import gguf_source, make_plan, output_dtype, slim_copy
from moe_slim.dense.taskslim import (
    plans_for_task,
    probe_task,
    retention_interval,
    split_task,
)
from moe_slim.dense.tasks import read_task_file
from moe_slim.dense.tiny import save_tiny, synthetic_tasks, tiny_model, toy_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    save_tiny(tiny_model("llama", seed=4), root / "llama")
    return root, synthetic_tasks(root / "tasks", n_per_class=30)


def test_baselines_keep_the_layers_they_name():
    lp = {"decoder": [10] * 30}
    assert keep_last_selection(lp, 60).keep == {"decoder": [24, 25, 26, 27, 28, 29]}
    assert evenly_spaced_selection(lp, 60).keep == {"decoder": [0, 6, 12, 17, 23, 29]}
    assert evenly_spaced_selection(lp, 30).keep == {"decoder": [0, 14, 29]}
    assert evenly_spaced_selection({"encoder": [5] * 6}, 10).keep == {"encoder": [0, 5]}


def test_every_plan_has_the_probscale_plans_size(setup):
    root, tasks = setup
    model, tok = tiny_model("llama", seed=4), toy_tokenizer()
    train, _ = split_task(read_task_file(tasks["topic"]), 0.2, 0)
    pm = probe_task(model, tok, train, max_length=32, n_folds=3)
    plans = plans_for_task(model, pm, "x2")
    assert set(plans) >= {"probscale-contiguous", "block-influence", "angular", "first-n", "last-n", "evenly-spaced",
                          "random-0", "random-1", "random-2"}
    sizes = {m: s.params for m, s in plans.items()}
    assert len(set(sizes.values())) == 1, sizes
    assert all(len(s.keep["decoder"]) == 3 for s in plans.values())
    assert plans["first-n"].keep == {"decoder": [0, 1, 2]} and plans["last-n"].keep == {"decoder": [3, 4, 5]}


def test_split_is_stratified_and_disjoint(setup):
    _, tasks = setup
    task = read_task_file(tasks["topic"])
    train, test = split_task(task, 0.2, seed=3)
    assert test.counts() == {"a": 6, "b": 6, "c": 6}
    assert train.counts() == {"a": 24, "b": 24, "c": 24}
    assert sorted(train.texts + test.texts) == sorted(task.texts)


def test_classifier_base_is_the_slimmed_model_and_only_top_layers_train():
    model, tok = tiny_model("llama", seed=1), toy_tokenizer()
    keep = {"decoder": [0, 2, 5]}
    slim = slim_copy(model, keep)
    clf = to_classifier(slim, tok, ["x", "y"], seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    want = slim.base_model(input_ids=ids).last_hidden_state
    got = clf.base_model(input_ids=ids).last_hidden_state
    assert torch.equal(want, got)
    counts = set_trainable(clf, 1)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in clf.named_parameters()
                         if n.startswith(("model.layers.2.", "model.norm.", "score."))}
    assert counts["trainable"] == sum(p.numel() for n, p in clf.named_parameters() if n in trainable)
    # the classifier owns copies: fine-tuning it cannot change the source model
    assert all(a.data_ptr() != b.data_ptr()
               for a, b in zip(clf.base_model.layers[2].parameters(), model.base_model.layers[5].parameters()))


def test_retention_is_the_ratio_of_accuracies():
    slim = np.array([1, 0, 1, 1, 0, 1, 1, 1.0])
    full = np.array([1, 1, 1, 1, 0, 1, 1, 1.0])
    r = retention_interval(slim, full)
    assert r["retention"] == pytest.approx(6 / 7, abs=1e-12)
    assert r["n"] == 8 and r["ci95"][0] <= r["retention"] <= r["ci95"][1]


def test_slim_dense_task_writes_a_text_classifier_with_its_retention(setup, capsys):
    root, tasks = setup
    out = root / "clf"
    assert main(["slim-dense", str(root / "llama"), "--task", str(tasks["topic"]), "--budget", "x2", "--steps", "30",
                 "--max-length", "32", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    info = json.loads((out / "slim.json").read_text())
    r = info["retention"]
    assert r["n"] == 18 and f"(n={r['n']})" in line
    assert r["retention"] == pytest.approx(r["accuracy"] / r["full_accuracy"], abs=1e-12)
    clf = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert clf.config.num_hidden_layers == 3 and clf.config.num_labels == 3
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert f"n = {r['n']}" in card.text and str(root) not in card.text
    # the reloaded checkpoint scores the held-out texts exactly as measured
    from moe_slim.dense.classify import correct

    _, test = split_task(read_task_file(tasks["topic"]), 0.2, 0)
    assert float(correct(clf, toy_tokenizer(), test, max_length=32).mean()) == pytest.approx(r["accuracy"])


def test_slim_dense_task_bad_inputs(setup, tmp_path, capsys):
    root, tasks = setup
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"w{i} w{i + 1}", "label": "a"}) + "\n" for i in range(10)))
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    for args in (["--task", str(tasks["topic"]), "--plan", str(plan)], [], ["--task", str(one)],
                 ["--task", str(tasks["topic"]), "--method", "magic"]):
        capsys.readouterr()
        assert main(["slim-dense", str(root / "llama"), *args, "--out", str(tmp_path / "o")]) != 0
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and err[0].startswith("moe-slim: "), err
        assert not (tmp_path / "o").exists()


def _tiny_gguf(path, file_type: int = 3):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_source_is_written_as_bfloat16_and_says_so(tmp_path, monkeypatch, capsys):
    src = _tiny_gguf(tmp_path / "m.Q4_1.gguf")
    assert gguf_source(src) == "GGUF MOSTLY_Q4_1"
    assert gguf_source(tmp_path) == "GGUF MOSTLY_Q4_1"  # a folder holding one .gguf
    model = tiny_model("llama")
    assert output_dtype("auto", model, None) == torch.float32
    assert output_dtype("auto", model, "GGUF MOSTLY_Q4_1") == torch.bfloat16
    assert output_dtype("float32", model, "GGUF MOSTLY_Q4_1") == torch.float32
    import moe_slim.dense.slim as slim

    monkeypatch.setattr(slim, "load_dense", lambda p: (tiny_model("llama"), toy_tokenizer()))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(make_plan(tiny_model("llama"), {"decoder": [0, 5]}, method="test")))
    out = tmp_path / "out"
    assert main(["slim-dense", str(src), "--plan", str(plan), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "GGUF MOSTLY_Q4_1, de-quantized on load; written as bfloat16" in line
    assert "de-quantized on load; written as bfloat16" in (out / "README.md").read_text()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_explicit_budget_skips_the_scaling_sweep(setup, tmp_path, capsys):
    root, tasks = setup
    out = tmp_path / "probe"
    assert main(["probe", str(root / "llama"), "--tasks", str(tasks["topic"]), "--budget", "x2", "--folds", "3",
                 "--no-compare", "--out", str(out)]) == 0
    assert not (out / "scaling.json").exists()
    assert "scaling:" not in capsys.readouterr().err
    out2 = tmp_path / "probe2"
    assert main(["probe", str(root / "llama"), "--tasks", str(tasks["topic"]), "--budget", "x2", "--folds", "3",
                 "--no-compare", "--scaling", "0.3,0.6", "--out", str(out2)]) == 0
    assert (out2 / "scaling.json").exists()


def test_first_pooling_reads_the_first_real_token_on_either_padding_side():
    from moe_slim.dense.features import _pool

    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(_pool(h, right, "first"), h[[0, 1], [0, 0]])
    assert torch.equal(_pool(h, left, "first"), h[[0, 1], [1, 2]])
    assert torch.equal(_pool(h, right, "last"), h[[0, 1], [2, 1]])


@pytest.mark.parametrize("model_type,want", [("bert", "first"), ("llama", "last"), ("t5", "last")])
def test_readout_pooling_is_the_token_the_family_classifier_reads(model_type, want):
    from moe_slim.dense.classify import readout_pooling

    assert readout_pooling(tiny_model(model_type)) == want


def test_readout_probe_on_an_encoder_reads_cls(setup):
    """The readout probe's last row is a probe on exactly the [CLS] state the BERT classifier's pooler reads."""
    from moe_slim.dense.features import extract_features
    from moe_slim.errors import MoeSlimError

    _, tasks = setup
    model, tok = tiny_model("bert", seed=2), toy_tokenizer()
    train, _ = split_task(read_task_file(tasks["topic"]), 0.2, 0)
    feats = extract_features(model, tok, train.texts[:4], pooling="first", max_length=32)
    ids = tok(train.texts[:4], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = model.base_model(**ids).last_hidden_state[:, 0]
    assert torch.allclose(torch.from_numpy(feats.final()).float(), cls, atol=1e-5)
    pm = probe_task(model, tok, train, max_length=32, n_folds=3, pooling="readout")
    assert pm.meta["pooling"] == "first"
    with pytest.raises(MoeSlimError, match="probe pooling"):
        probe_task(model, tok, train, max_length=32, n_folds=3, pooling="cls")


def test_genre_and_catalogid_take_their_labels_from_the_origin(tmp_path):
    from moe_slim.dense.tasks import builtin_task, catalog_classes

    gen = tmp_path / "general"
    gen.mkdir()
    rows = [{"text": f"{src} text {i}", "origin": f"{src}:part{i % 2}"} for src in ("fortunes", "plays") for i in range(5)]
    (gen / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    genre = builtin_task("genre", tmp_path, split="train", per_class=4)
    assert genre.counts() == {"fortunes": 4, "plays": 4}
    assert all(t.startswith(lab) for t, lab in zip(genre.texts, genre.labels))
    tr = tmp_path / "translation"
    tr.mkdir()
    # split sizes differ: 'big' leads train but is absent from test; 'gcc' and 'git' are in both
    counts = {"train": {"big": 9, "gcc": 6, "git": 5}, "test": {"gcc": 3, "git": 4, "hg": 1}}
    for split, cats in counts.items():
        recs = [{"src": f"{cat} message {i}", "ref": f"ref {i}", "tgt_lang": lang,
                 "origin": f"gettext:/usr/share/locale/{lang}/LC_MESSAGES/{cat}.mo"}
                for cat, n in cats.items() for i in range(n) for lang in ("de", "fr")]  # each message in 2 languages
        (tr / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tr / "catalog_test.jsonl").write_text(json.dumps({"src": "x", "ref": "y", "tgt_lang": "de",
                                                       "origin": "gettext:/l/de/LC_MESSAGES/held.mo"}) + "\n")
    assert catalog_classes(tmp_path, n=2) == ["gcc", "git"]
    assert catalog_classes(tmp_path, n=3) == ["gcc", "git"]  # only these two are in every split
    for split, per in (("train", 5), ("test", 3)):
        t = builtin_task("catalogid", tmp_path, split=split, per_class=per)
        assert set(t.labels) == {"gcc", "git"} and len(set(t.texts)) == len(t.texts)  # one text per message
        assert all(t.startswith(lab + " ") for t, lab in zip(t.texts, t.labels))
    assert builtin_task("catalogid", tmp_path, split="test", per_class=3).counts() == {"gcc": 3, "git": 3}
