"""Multiple-choice items are derived deterministically and scored by lm-eval offline on the in-memory model."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from eval_fixtures import (
    fixture_records,
    tiny_moe,
    tiny_tokenizer,
    torch_threads,
    write_fixture_data,
)

from moe_slim.errors import MoeSlimError
from moe_slim.evals.mc import (
    TASK_PREFIX,
    TaskResolver,
    evals_dir,
    prepare_mc_data,
    run_mc,
    task_config,
)
from moe_slim.evals.mc_items import BUILDERS, MC_TASKS, N_CHOICES
from moe_slim.outputs import cache_dir


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.mark.parametrize("task", MC_TASKS)
def test_builders_are_deterministic_and_well_formed(task):
    domain, build = BUILDERS[task]
    records = fixture_records(12)[domain]
    items = build(records)
    assert items == build(records)  # same input, same items
    assert len(items) >= 10
    for it in items:
        assert len(it["choices"]) == N_CHOICES and 0 <= it["gold"] < N_CHOICES
        assert len({c.strip().lower() for c in it["choices"]}) == N_CHOICES, it
        assert it["query"]
    golds = [it["gold"] for it in items]
    assert len(set(golds)) > 1  # the right answer is not always in the same place


def test_item_content():
    recs = fixture_records(12)
    tr = {it["source_id"]: it for it in BUILDERS["translation_choice"][1](recs["translation"])}
    rec = recs["translation"][4]
    item = tr[rec["id"]]
    assert item["query"] == rec["prompt"]
    assert item["choices"][item["gold"]] == rec["ref"] + "<|end|>"
    same_lang = {r["ref"] + "<|end|>" for r in recs["translation"] if r["tgt_lang"] == rec["tgt_lang"]}
    assert set(item["choices"]) <= same_lang
    math_items = {it["source_id"]: it for it in BUILDERS["math_choice"][1](recs["math"])}
    m = math_items[recs["math"][0]["id"]]
    assert m["choices"][m["gold"]] == " " + recs["math"][0]["answer"]
    code = BUILDERS["code_next_line"][1](recs["code"])[0]
    src = next(r["text"] for r in recs["code"] if r["id"] == code["source_id"])
    assert code["query"] + code["choices"][code["gold"]] in src


def test_cache_reused_and_rebuilt(tmp_path):
    data = write_fixture_data(tmp_path / "data", 12)
    cache = tmp_path / "cache"
    first = prepare_mc_data("general_cloze", data, cache)
    assert first["rebuilt"] and first["path"].startswith(str(cache))
    again = prepare_mc_data("general_cloze", data, cache)
    assert not again["rebuilt"] and again["sha256"] == first["sha256"]
    write_fixture_data(tmp_path / "data", 14)  # the source changed: the items are rebuilt
    changed = prepare_mc_data("general_cloze", data, cache)
    assert changed["rebuilt"] and changed["source_sha256"] != first["source_sha256"]


def test_yaml_definitions():
    for task in MC_TASKS:
        text = (evals_dir() / f"{TASK_PREFIX}{task}.yaml").read_text()
        assert f"custom_dataset: !function moe_slim_tasks.{task}\n" in text
        cfg = task_config(task, "/x.jsonl")
        assert cfg["task"] == TASK_PREFIX + task and cfg["dataset_path"] == "json" and "custom_dataset" not in cfg
        assert cfg["dataset_kwargs"]["data_files"] == {"test": "/x.jsonl"}
        assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}


def test_lm_eval_loads_our_tasks_from_any_directory(tmp_path, monkeypatch):
    """lm-eval's own TaskManager, started elsewhere, builds the items through moe_slim_tasks.py."""
    from lm_eval.tasks import TaskManager, get_task_dict

    data = write_fixture_data(tmp_path / "data", 12)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manager = TaskManager(include_path=str(evals_dir()), include_defaults=False,
                          metadata={"data_dir": str(data)})
    task = get_task_dict([f"{TASK_PREFIX}translation_choice"], manager)[f"{TASK_PREFIX}translation_choice"]
    docs = list(task.test_docs())
    assert len(docs) == 36 and {"query", "choices", "gold"} <= set(docs[0])
    assert not (data / "mc").exists()  # the derived items are cached outside the data (an input)
    assert any((cache_dir() / "mc").glob("*/translation_choice.jsonl"))


def test_lm_eval_runs_offline_on_in_memory_model(tmp_path):
    data = write_fixture_data(tmp_path / "data", 12)
    tok = tiny_tokenizer()
    model = tiny_moe(tok)
    with torch_threads(1):
        out = run_mc(model, tok, ["translation_choice", "code_next_line"], data_dir=data, limit=6, batch_size=8)
    for task in ("translation_choice", "code_next_line"):
        res = out["tasks"][task]
        assert res["n"] == 6
        assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert out["data"]["translation_choice"]["n"] == 36
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    json.dumps(out)  # JSON-ready


def test_unknown_task_names():
    with pytest.raises(MoeSlimError, match="unknown task 'nonsense'"):
        TaskResolver().manager(["nonsense"])
    with pytest.raises(MoeSlimError, match="include path"):
        TaskResolver("/no/such/dir")
    with pytest.raises(MoeSlimError, match="unknown multiple-choice task"):
        prepare_mc_data("nonsense", "data")


def test_user_lm_eval_task_from_include_path(tmp_path):
    data = write_fixture_data(tmp_path / "data", 12)
    built = prepare_mc_data("math_choice", data)
    cfg = task_config("math_choice", built["path"])
    cfg.update(task="my_local_task", tag=None)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "my_local_task.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    tok = tiny_tokenizer()
    with torch_threads(1):
        out = run_mc(tiny_moe(tok), tok, ["my_local_task", "general_cloze"], data_dir=data, limit=4,
                     include_path=tasks_dir)
    assert out["tasks"]["my_local_task"]["n"] == 4 and "acc_norm" in out["tasks"]["my_local_task"]
    assert out["tasks"]["general_cloze"]["n"] == 4
