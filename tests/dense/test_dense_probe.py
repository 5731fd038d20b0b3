"""The probe run end to end on a tiny Llama whose layers 2 and 4 are made identity on purpose,
and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_slim.cli import main
from moe_slim.dense.tiny import (
    make_identity_layers,
    save_tiny,
    synthetic_tasks,
    tiny_model,
)

IDENTITY = [2, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    # seed 4: a random tiny model whose real layers each add probe-readable information on these tasks
    # (checked below), so that the layers made identity are exactly the ones with nothing to offer
    model = make_identity_layers(tiny_model("llama", seed=4), IDENTITY)
    save_tiny(model, root / "model")
    tasks = synthetic_tasks(root / "tasks", n_per_class=30)
    held_out = synthetic_tasks(root / "held_out", n_per_class=20, seed=1)
    return root, tasks, held_out


def test_probe_drops_exactly_the_identity_layers(setup):
    root, tasks, held_out = setup
    out = root / "run"
    rc = main(["probe", str(root / "model"), "--tasks", f"{tasks['topic']},{tasks['order']}", "--weights",
               "order=2", "--budget", "4L", "--scaling", "0.2,0.5", "--folds", "3", "--out", str(out),
               "--eval-tasks", f"{held_out['topic']},{held_out['order']}"])
    assert rc == 0
    for name in ("probe_matrix.json", "probe_matrix.csv", "plan.json", "scaling.json", "compare.json",
                 "summary.json", "probe_matrix.png", "scaling.png", "plans/block-influence.json"):
        assert (out / name).is_file(), name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "probscale-contiguous"
    assert plan["drop"] == {"decoder": IDENTITY}
    assert plan["keep"] == {"decoder": [0, 1, 4, 5]}
    free = json.loads((out / "plans" / "probscale-free.json").read_text())
    assert free["drop"] == {"decoder": IDENTITY}
    pm = json.loads((out / "probe_matrix.json").read_text())
    rel = np.array(pm["relevance"]["decoder"])
    acc = np.array(pm["accuracy"]["decoder"])
    assert acc.shape == (7, 2)  # embeddings + 6 layers, 2 tasks
    assert np.all(rel[IDENTITY] == 0)
    assert np.all(np.delete(rel, IDENTITY) > 0), f"precondition: every real layer adds something ({rel})"
    # identity layer outputs equal their inputs -> identical probe rows
    for i in IDENTITY:
        assert np.array_equal(acc[i + 1], acc[i])
    assert pm["weights"] == {"topic": 1.0, "order": 2.0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["measured_on"] == "held-out texts" and summary["held_out_tasks"]["order"]["examples"] == 40
    scaling = json.loads((out / "scaling.json").read_text())
    assert len(scaling["points"]) == 2 and {c["target"] for c in scaling["checks"]} == {0.95, 0.98}
    # the budget is reported as achieved, and every baseline was measured at exactly that size
    assert summary["budget"]["achieved_params"] == plan["selection"]["retained_layer_params"]
    assert summary["budget"]["kept_layers"] == 4 and summary["budget"]["layers"] == 6
    compare = json.loads((out / "compare.json").read_text())
    assert {m["retained_layer_params"] for m in compare.values()} == {summary["budget"]["achieved_params"]}
    assert "angular" in compare
    # and slim-dense applies the plan
    assert main(["slim-dense", str(root / "model"), "--plan", str(out / "plan.json"), "--out", str(root / "slim")]) == 0
    assert json.loads((root / "slim" / "config.json").read_text())["num_hidden_layers"] == 4


def _one_error(capsys) -> str:
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moe-slim:")]
    assert len(errs) == 1, errs
    return errs[0]


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    root, tasks, _ = setup
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"w{i} w{i + 1}", "label": "x"}) + "\n" for i in range(10)))
    args = ["probe", str(root / "model"), "--scaling", "off", "--out", str(tmp_path / "o")]
    assert main(args + ["--tasks", str(one), "--budget", "0.5"]) == 2
    assert "has 1 label" in _one_error(capsys)
    assert main(args + ["--tasks", str(tasks["topic"]), "--budget", "0.1"]) == 2
    assert "below one layer" in _one_error(capsys)
    assert main(args + ["--tasks", str(tasks["topic"]), "--budget", "0.5", "--weights", "nope=2"]) == 2
    assert "not among the tasks" in _one_error(capsys)
    assert main(args + ["--tasks", "nosuchtask", "--budget", "0.5"]) == 2
    assert "unknown task" in _one_error(capsys)
    assert main(args + ["--tasks", "langid", "--budget", "0.5", "--data", str(tmp_path / "nodata")]) == 2
    assert "data directory" in _one_error(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1", "label": "a"}\n{"txt": "w2", "label": "b"}\n')
    assert main(args + ["--tasks", str(bad), "--budget", "0.5"]) == 2
    assert "bad.jsonl:2" in _one_error(capsys)
    assert main(args + ["--tasks", str(tasks["topic"]), "--budget", "retain:0.95"]) == 2
    assert "scaling" in _one_error(capsys)
    assert main(args + ["--tasks", str(tasks["topic"]), "--budget", "1.0"]) == 2
    assert "keeps every layer" in _one_error(capsys)
    assert main(args + ["--tasks", str(tasks["topic"]), "--budget", "0.5", "--folds", "40"]) == 2
    assert "40-fold cross-validation" in _one_error(capsys)
    assert not (tmp_path / "o").exists()


def test_builtin_tasks_from_a_data_dir(tmp_path):
    from moe_slim.dense.tasks import load_tasks

    rows = {"general": ["the cat sat", "a day out", "rain again", "it is late"] * 3,
            "math": ["2 + 2 = 4", "x^2 - 1 = 0", "sum of 3 and 5", "7 * 8 = 56"] * 3,
            "code": ["def f(x): return x", "for i in range(3): pass", "x = [1, 2]", "print('hi')"] * 3}
    for dom, texts in rows.items():
        (tmp_path / dom).mkdir()
        (tmp_path / dom / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "translation").mkdir()
    pairs = [{"src": f"hello number {i}", "ref": f"{lang} text {i}", "tgt_lang": lang, "text": "x"}
             for lang in ("de", "fr", "es") for i in range(30)]
    (tmp_path / "translation" / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tasks = {t.name: t for t in load_tasks("langid,domainid,pairmatch", tmp_path, per_class=6, seed=1)}
    assert tasks["langid"].counts() == {"de": 6, "en": 6, "es": 6, "fr": 6}
    assert tasks["domainid"].counts() == {"code": 6, "general": 6, "math": 6}
    assert tasks["pairmatch"].counts() == {"match": 6, "mismatch": 6}
    for text, label in zip(tasks["pairmatch"].texts, tasks["pairmatch"].labels):
        src_i = text.split("hello number ")[1].split("<|")[0]
        ref_i = text.split(" text ")[1].split("<|")[0]
        assert (src_i == ref_i) == (label == "match")
    again = load_tasks("pairmatch", tmp_path, per_class=6, seed=1)[0]
    assert again.texts == tasks["pairmatch"].texts


@pytest.mark.parametrize("model_type", ["t5", "bert", "qwen3_moe"])
def test_probe_and_slim_on_other_families(setup, tmp_path, model_type):
    from transformers import AutoConfig

    _, tasks, _ = setup
    src = save_tiny(tiny_model(model_type), tmp_path / "model")
    assert main(["probe", str(src), "--tasks", str(tasks["topic"]), "--budget", "0.5", "--scaling", "off",
                 "--no-compare", "--folds", "3", "--out", str(tmp_path / "probe")]) == 0
    plan = json.loads((tmp_path / "probe" / "plan.json").read_text())
    pm = json.loads((tmp_path / "probe" / "probe_matrix.json").read_text())
    stacks = {"t5": ["encoder", "decoder"], "bert": ["encoder"], "qwen3_moe": ["decoder"]}[model_type]
    assert list(plan["keep"]) == stacks and list(pm["accuracy"]) == stacks
    assert plan["selection"]["retained_layer_params"] <= plan["budget"]["params"]
    assert main(["slim-dense", str(src), "--plan", str(tmp_path / "probe" / "plan.json"),
                 "--out", str(tmp_path / "slim")]) == 0
    cfg = AutoConfig.from_pretrained(str(tmp_path / "slim"))
    counts = {"t5": ("num_layers", "num_decoder_layers"), "bert": ("num_hidden_layers",),
              "qwen3_moe": ("num_hidden_layers",)}[model_type]
    assert [getattr(cfg, k) for k in counts] == [len(plan["keep"][s]) for s in stacks]


def test_hard_builtin_tasks(tmp_path):
    from eval_fixtures import write_fixture_data

    from moe_slim.dense.tasks import load_tasks

    data = write_fixture_data(tmp_path / "data", n_per_domain=24, splits=("train",))
    tasks = {t.name: t for t in load_tasks("pairmatch-hard,codeline,mathanswer,cloze", data, per_class=4, seed=0)}
    for name in ("codeline", "mathanswer", "cloze"):
        assert tasks[name].counts() == {"right": 4, "wrong": 4}, name
    assert tasks["pairmatch-hard"].counts() == {"match": 4, "mismatch": 4}
    # a hard negative keeps the pair's target language: the tag before the ref is the one the prompt asks for
    for text in tasks["pairmatch-hard"].texts:
        assert text.count("<|") >= 2
    again = load_tasks("pairmatch-hard,cloze", data, per_class=4, seed=0)
    assert again[0].texts == tasks["pairmatch-hard"].texts and again[1].texts == tasks["cloze"].texts
