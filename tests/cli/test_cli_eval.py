"""The evaluate() API and `moe-slim eval`: suites, results JSON, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from eval_fixtures import (
    save_checkpoint,
    tiny_moe,
    tiny_tokenizer,
    torch_threads,
    write_fixture_data,
)

from moe_slim.cli import main
from moe_slim.errors import MoeSlimError
from moe_slim.evals.run import evaluate, load_results, plan_evaluation


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture()
def data(tmp_path):
    return write_fixture_data(tmp_path / "data", 8)


def test_unknown_suite_task_and_bad_requests(data, monkeypatch):
    from moe_slim.modeling import hub

    # a machine with hub datasets cached (on one with none, offline, registry names stop earlier, in one line:
    # tests/evals/test_external_names.py), so the name itself is what is refused
    monkeypatch.setattr(hub, "dataset_cached", lambda repo=None: True)
    with pytest.raises(MoeSlimError, match="unknown suite 'nope'"):
        plan_evaluation("nope", data_dir=data)
    with pytest.raises(MoeSlimError, match="unknown task 'bogus'"):
        plan_evaluation("quick", tasks="translation,bogus", data_dir=data)
    with pytest.raises(MoeSlimError, match="data directory .* does not exist"):
        plan_evaluation("quick", data_dir=data.parent / "missing")
    with pytest.raises(MoeSlimError, match="no translation task"):
        plan_evaluation("quick", tasks=["perplexity"], data_dir=data, baseline=["x"])
    with pytest.raises(MoeSlimError, match="--limit"):
        plan_evaluation("quick", data_dir=data, limit=0)
    plan = plan_evaluation("quick", tasks="general_cloze,mc,translation", data_dir=data, limit=3)
    assert plan.tasks == ["general_cloze", "translation_choice", "math_choice", "code_next_line", "translation"]
    assert plan.suite.mc_limit == 3 and plan.suite.translation_per_pair == 3
    (data / "math" / "test.jsonl").unlink()
    with pytest.raises(MoeSlimError, match="no math test data"):
        plan_evaluation("quick", tasks="math_gen", data_dir=data)
    plan_evaluation("quick", tasks="translation", data_dir=data)


def test_cli_unknown_suite_is_one_line_and_writes_nothing(tmp_path, data):
    out = tmp_path / "res.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "moe_slim.cli", "eval", str(tmp_path / "no_model"), "--suite",
                           "nope", "--out", str(out), "--data", str(data)], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-slim: unknown suite 'nope'"), proc.stderr
    assert not out.exists() and list(tmp_path.glob("*res.json*")) == []


def test_cli_unknown_task_in_process(tmp_path, data, capsys, monkeypatch):
    from moe_slim.modeling import hub

    monkeypatch.setattr(hub, "dataset_cached", lambda repo=None: True)  # as above: the name is what is refused
    out = tmp_path / "res.json"
    rc = main(["eval", str(tmp_path), "--tasks", "translation,bogus", "--out", str(out), "--data", str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "unknown task 'bogus'" in err[0]
    assert not out.exists()


def test_api_quick_suite_in_memory(data):
    tok = tiny_tokenizer()
    model = tiny_moe(tok)
    model.train()
    with torch_threads(1):
        res = evaluate(model, tok, "quick", data_dir=data, limit=3, baseline=["x"] * 9)
    assert model.training  # mode restored
    assert res["suite"] == "quick" and res["suite_version"].startswith("quick/v")
    assert set(res["tasks"]) == {"translation", "translation_choice", "math_choice", "code_next_line",
                                 "general_cloze", "math_gen", "perplexity"}
    tr = res["tasks"]["translation"]
    assert set(tr["pairs"]) == {"en-de", "en-fr", "en-es"} and tr["overall"]["n"] == 9
    assert all("copy_chrf" in p for p in tr["pairs"].values())
    assert len(tr["hypotheses"]) == 9 and set(tr["signatures"]) == {"bleu", "chrf", "chrf++"}
    assert tr["baseline"]["overall"]["chrf"]["baseline"] == 0.0
    assert res["tasks"]["general_cloze"]["n"] == 3 and "acc_norm" in res["tasks"]["general_cloze"]
    assert res["tasks"]["math_gen"]["n"] == 3
    assert res["tasks"]["perplexity"]["domains"]["code"]["docs"] == 3
    assert res["model"]["fingerprint"]["model_type"] == "qwen3_moe" and "weights_hash" in res["model"]
    files = res["data"]["files"]
    assert {"translation/test.jsonl", "math/test.jsonl", "code/test.jsonl", "general/test.jsonl",
            "mc/general_cloze.jsonl"} <= set(files)
    assert all(len(h) == 64 for h in files.values())
    assert {"translation", "mc", "math_gen", "perplexity", "total"} <= set(res["timings_s"])
    assert "translation/chrf" in res["metrics"] and "perplexity/ppl" in res["metrics"]
    assert "torch" in res["libraries"] and "sacrebleu" in res["libraries"]
    json.dumps(res, allow_nan=False)


def test_cli_end_to_end(tmp_path, data, capsys):
    tok = tiny_tokenizer()
    ckpt = save_checkpoint(tiny_moe(tok), tok, tmp_path / "ckpt")
    out = tmp_path / "res.json"
    args = ["eval", str(ckpt), "--suite", "translation", "--out", str(out), "--data", str(data), "--limit", "2",
            "--quiet"]
    with torch_threads(1):
        capsys.readouterr()
        assert main(args) == 0
        res = load_results(out)
        assert res["tasks"]["translation"]["overall"]["n"] == 6
        # the summary shows chrF with its interval, n and the copy-the-source baseline beside it
        m = res["metrics"]
        (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("translation/chrf\t")]
        assert (f"{m['translation/chrf']:.2f} [{m['translation/chrf_lo']:.2f}, {m['translation/chrf_hi']:.2f}] "
                f"(n = 6; copy the source {m['translation/copy_chrf']:.2f}, difference ") in line
        assert m["translation/chrf_lo"] <= m["translation/chrf"] <= m["translation/chrf_hi"]
        assert m["translation/chrf_delta_vs_copy"] == pytest.approx(m["translation/chrf"] - m["translation/copy_chrf"])
        assert res["model"]["checkpoint"] == str(ckpt)
        capsys.readouterr()
        before = out.read_bytes()
        assert main(args) == 2  # refused: exists
        assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
        out2 = tmp_path / "res2.json"
        assert main([*args[:5], str(out2), *args[6:], "--baseline", str(out)]) == 0
    base = load_results(out2)["tasks"]["translation"]["baseline"]
    assert base["n"] == 6 and base["overall"]["chrf"]["delta"] == 0.0


def test_split_catalog_test_reads_translation_from_it_and_others_from_test(data):
    """--split catalog_test: translation tasks read translation/catalog_test.jsonl, other domains test."""
    with pytest.raises(MoeSlimError, match="unknown split 'nope'"):
        plan_evaluation("quick", data_dir=data, split="nope")
    with pytest.raises(MoeSlimError, match="no translation catalog_test data"):
        plan_evaluation("quick", tasks="translation", data_dir=data, split="catalog_test")
    src = (data / "translation" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (data / "translation" / "catalog_test.jsonl").write_text("\n".join(src[::-1]) + "\n", encoding="utf-8")
    tok = tiny_tokenizer()
    with torch_threads(1):
        res = evaluate(tiny_moe(tok), tok, "quick", tasks="translation,translation_choice,perplexity", data_dir=data,
                       limit=2, split="catalog_test")
    assert res["split"] == "catalog_test"
    assert {"translation/catalog_test.jsonl", "code/test.jsonl", "mc/translation_choice_catalog_test.jsonl"} \
        <= set(res["data"]["files"])
    assert "translation/test.jsonl" not in res["data"]["files"]
    assert res["tasks"]["translation"]["overall"]["n"] == 6   # two per pair
    assert res["tasks"]["translation_choice"]["n"] == 2
