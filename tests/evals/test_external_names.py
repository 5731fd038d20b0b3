"""Names from outside: Hugging Face Hub ids for MODEL, lm-eval registry tasks, standard translation test
sets. Offline (as tests always are) each is resolved, or refused in one line before any model work."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_fixtures import save_checkpoint, tiny_moe, tiny_tokenizer, write_fixture_data

from moe_slim.cli import main
from moe_slim.errors import MoeSlimError
from moe_slim.evals.run import plan_evaluation
from moe_slim.evals.testsets import StandardTestSet, load_testset, resolve_testset
from moe_slim.modeling.hub import resolve_model


def test_model_names_resolve_to_local_paths_or_hub_ids(tmp_path: Path) -> None:
    local = tmp_path / "Qwen" / "Qwen3-30B-A3B"  # a local path always wins over a hub id of the same name
    local.mkdir(parents=True)
    assert resolve_model(local) == local
    with pytest.raises(MoeSlimError, match="as a Hugging Face Hub id it needs the hub, which is offline here"):
        resolve_model("Qwen/Qwen3-30B-A3B")
    with pytest.raises(MoeSlimError, match="model no/such/dir does not exist"):
        resolve_model("no/such/dir")


def test_hub_id_on_the_command_line_is_one_line_offline(tmp_path: Path, capsys) -> None:
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "x"}\n')
    assert main(["observe", "openai/gpt-oss-20b", "--calib", f"general={calib}", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openai/gpt-oss-20b is not a local directory" in err[0] and "offline" in err[0]


def test_lm_eval_registry_tasks_need_no_include_path_and_fail_offline_in_one_line(tmp_path: Path, capsys) -> None:
    data = write_fixture_data(tmp_path / "data", n_per_domain=3)
    plan = plan_evaluation("quick", tasks="arc_easy,translation_choice", data_dir=data)
    assert plan.external == ["arc_easy"] and "translation_choice" in plan.mc_tasks
    with pytest.raises(MoeSlimError, match="unknown task 'arc_easyy'.*lm-eval's registry"):
        plan.resolver.manager(["arc_easyy"])
    tok = tiny_tokenizer()
    ckpt = save_checkpoint(tiny_moe(tok), tok, tmp_path / "ckpt")
    capsys.readouterr()
    rc = main(["eval", str(ckpt), "--tasks", "arc_easy", "--limit", "2", "--data", str(data),
               "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "arc_easy need their datasets from the Hugging Face hub, which is offline here" in err[0]
    assert not (tmp_path / "r.json").exists()


def test_translation_test_sets_resolve_by_name() -> None:
    assert resolve_testset("wmt22:en-de") == StandardTestSet("wmt22", "en", "de", "sacrebleu")
    assert resolve_testset("FLORES200:en-fr") == StandardTestSet("flores200", "en", "fr", "datasets")
    cases = {"wmt22": "is not NAME:SRC-TGT", "wmt99:en-de": "unknown test set 'wmt99'",
             "wmt22:en-cs": "translates en into de, fr, es only", "wmt16:en-es": "has no pair en-es"}
    for spec, says in cases.items():
        with pytest.raises(MoeSlimError, match=says):
            resolve_testset(spec)


def test_translation_test_sets_fail_in_one_line_without_network(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SACREBLEU", str(tmp_path / "sacrebleu"))  # no cached copy: it must download
    with pytest.raises(MoeSlimError, match="is read from the Hugging Face hub .* offline here"):
        load_testset(resolve_testset("flores200:en-de"))
    with pytest.raises(MoeSlimError, match="could not download test set wmt22:en-de"):
        load_testset(resolve_testset("wmt22:en-de"))
    data = write_fixture_data(tmp_path / "data", n_per_domain=3)
    tok = tiny_tokenizer()
    ckpt = save_checkpoint(tiny_moe(tok), tok, tmp_path / "ckpt")
    capsys.readouterr()
    rc = main(["eval", str(ckpt), "--translation-testset", "flores200:en-de", "--data", str(data),
               "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "flores200:en-de is read from the Hugging Face hub" in err[0], err
    assert not (tmp_path / "r.json").exists()
