"""Names from outside: Hugging Face Hub ids for MODEL, lm-eval registry tasks, standard translation test
sets. Offline (as tests always are) each is resolved, or refused in one line before any model work."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_fixtures import save_checkpoint, tiny_moe, tiny_tokenizer, write_fixture_data

from moe_slim.cli import main
from moe_slim.errors import MoeSlimError
from moe_slim.evals.run import check_hub_datasets, plan_evaluation
from moe_slim.evals.testsets import StandardTestSet, load_testset, resolve_testset
from moe_slim.modeling import hub
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


def test_lm_eval_registry_tasks_need_no_include_path_and_fail_offline_in_one_line(tmp_path: Path, capsys,
                                                                                   monkeypatch) -> None:
    from huggingface_hub import constants

    data = write_fixture_data(tmp_path / "data", n_per_domain=3)
    with monkeypatch.context() as m:  # as if arc_easy's dataset had been cached on an earlier online run
        m.setattr(hub, "dataset_cached", lambda repo=None: repo in (None, "allenai/ai2_arc"))
        plan = plan_evaluation("quick", tasks="arc_easy,translation_choice", data_dir=data)
    assert plan.resolver.hub_datasets(plan.external) == {"arc_easy": "allenai/ai2_arc"}
    assert plan.external == ["arc_easy"] and "translation_choice" in plan.mc_tasks
    with pytest.raises(MoeSlimError, match="unknown task 'arc_easyy'.*lm-eval's registry"):
        plan.resolver.manager(["arc_easyy"])
    with monkeypatch.context() as m:  # other datasets are cached, not this one: named, before the model loads
        m.setattr(hub, "dataset_cached", lambda repo=None: repo is None)
        with pytest.raises(MoeSlimError, match=r"arc_easy need their datasets \(allenai/ai2_arc\) from the Hugging "
                                               r"Face hub, which is offline here"):
            check_hub_datasets(plan.resolver, plan.external)
    # a fresh machine (nothing cached): one line before lm-eval's registry is even indexed
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tok = tiny_tokenizer()
    ckpt = save_checkpoint(tiny_moe(tok), tok, tmp_path / "ckpt")
    capsys.readouterr()
    rc = main(["eval", str(ckpt), "--tasks", "arc_easy", "--limit", "2", "--data", str(data),
               "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert ("arc_easy read their datasets from the Hugging Face hub, which is offline here (HF_HUB_OFFLINE=1), "
            "and no hub dataset is cached here") in err[0]
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


def test_a_test_set_asked_for_as_a_task_points_to_the_option(tmp_path: Path) -> None:
    data = write_fixture_data(tmp_path / "data", n_per_domain=3)
    for name in ("wmt22", "flores200"):
        with pytest.raises(MoeSlimError, match=f"{name} is a translation test set.*--translation-testset {name}:en-de"):
            plan_evaluation("quick", tasks=name, data_dir=data)


def test_an_unreachable_hub_is_found_in_seconds_without_the_offline_variables(tmp_path: Path, monkeypatch) -> None:
    """No HF_HUB_OFFLINE, no network: one connection that fails fast, then one line (the hub clients once
    retried for 30 to 46 s, a line each time), and the process goes offline for what is cached."""
    import time

    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(MoeSlimError) as err:
        resolve_model("someone/some-moe")
    (line,) = str(err.value).splitlines()
    assert "needs the hub, which is not reachable from here (127.0.0.1:9" in line and "pass its local directory" in line
    assert constants.HF_HUB_OFFLINE is True
    with pytest.raises(MoeSlimError, match="flores200:en-de is read from the Hugging Face hub .* not reachable"):
        load_testset(resolve_testset("flores200:en-de"))
    assert time.monotonic() - start < hub.PROBE_SECONDS + 5
