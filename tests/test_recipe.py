"""``moe-slim run recipe.yaml``: the steps a recipe names, in one command, the recipe in the card; bad
recipes fail in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from eval_fixtures import write_fixture_data

from moe_slim.cli import main
from moe_slim.modeling.loading import load_model
from moe_slim.modeling.tiny import save_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    model = save_tiny("qwen3_moe", root / "model", seed=4, max_position_embeddings=1024)
    data = write_fixture_data(root / "data", n_per_domain=6, splits=("test", "calibration", "train", "validation"))
    return {"root": root, "model": model, "data": data}


def _recipe(w, tmp: Path, **over) -> Path:
    raw = {"model": str(w["model"]), "data_dir": str(w["data"]),
           "observe": {"calib": "translation=1,general=1@2k", "seq_len": 32, "samples": 256},
           "prune": {"criterion": "reap", "ratio": 0.5, "mix": {"translation": 1}},
           "eval": {"tasks": ["perplexity"], "limit": 2}}
    raw.update(over)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipe_observes_prunes_heals_evaluates_and_records_itself(w, tmp_path, capsys) -> None:
    path = _recipe(w, tmp_path, recover={"sft": {"steps": 2, "mix": "translation=1", "batch_size": 2,
                                                 "seq_len": 32, "val_examples": 2, "loss": "kd",
                                                 "teacher": "source", "mode": "router"}})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert steps["kept_per_layer"] == [4, 4] and "perplexity/ppl" in steps["metrics"] and steps["sft"]["steps"] == 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["prune"]["ratio"] == 0.5
    card = (out / "README.md").read_text()
    assert "## Recipe" in card and "criterion: reap" in card and "## Evaluation" in card
    # the card of the whole recipe: the source is the recipe's model (the SFT stage's source was a temporary
    # directory), SFT is one section of it, and no path of this machine is published
    assert "Source checkpoint: `model`" in card and ".run" not in card and "`slim`" not in card
    assert "## Recovery (SFT)" in card and "### Metrics" in card
    assert str(tmp_path) not in card and str(w["root"]) not in card
    assert steps["sft"]["loss"] == "kd" and steps["sft"]["teacher"]["source"] == str(w["model"])
    assert "Loss: `kd`" in card  # distilled from the recipe's source model
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data
    assert not data.eval_results and data.pipeline_tag == "text-generation"  # no made-up dataset ids or metrics
    tokens = int(steps["metrics"]["perplexity/tokens"])
    assert f"| perplexity/ppl | {steps['metrics']['perplexity/ppl']:.4g} |  | {tokens:,} tokens |" in card
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["perplexity/ppl"] == steps["metrics"]["perplexity/ppl"]
    model, _ = load_model(out)
    assert model.config.num_experts == 4
    assert not list(tmp_path.glob(".out.run")), "the work directory is removed"


def test_recipe_equals_the_commands_it_stands_for(w, tmp_path) -> None:
    path = _recipe(w, tmp_path, eval=None)
    assert main(["run", str(path), "--out", str(tmp_path / "via-recipe"), "--quiet"]) == 0
    calib = "translation=1,general=1@2k"
    assert main(["observe", str(w["model"]), "--calib", calib, "--data-dir", str(w["data"]), "--seq-len", "32",
                 "--samples", "256", "--out", str(tmp_path / "stats"), "--quiet"]) == 0
    assert main(["prune", str(w["model"]), "--stats", str(tmp_path / "stats"), "--ratio", "0.5", "--mix",
                 "translation=1", "--out", str(tmp_path / "by-hand"), "--quiet"]) == 0
    a, _ = load_model(tmp_path / "via-recipe")
    b, _ = load_model(tmp_path / "by-hand")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_merge_recipe_reuses_saved_stats(w, tmp_path) -> None:
    assert main(["observe", str(w["model"]), "--calib", "translation=1@2k", "--data-dir", str(w["data"]),
                 "--seq-len", "32", "--samples", "256", "--out", str(tmp_path / "stats"), "--quiet"]) == 0
    path = _recipe(w, tmp_path, observe=None, prune=None, stats=str(tmp_path / "stats"),
                   merge={"method": "hc-smoe", "ratio": 0.5, "max_tokens": 256})
    assert main(["run", str(path), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    assert json.loads((tmp_path / "merged" / "plan.json").read_text())["kind"] == "merge"


@pytest.mark.parametrize("over, says", [
    ({"prune": None}, "exactly one of 'prune' and 'merge'"),
    ({"merge": {"method": "ream", "ratio": 0.5}}, "exactly one of 'prune' and 'merge'"),
    ({"observe": None}, "give 'stats'"),
    ({"prune": {"ratio": 1.5}}, "prune.ratio must be a number < 1"),
    ({"prune": {"ratoi": 0.5}}, "unknown key 'ratoi' in prune"),
    ({"recover": {"sft": {"steps": 0}}}, "recover.sft.steps must be an integer >= 1"),
    ({"eval": {"limit": "many"}}, "eval.limit"),
    ({"colour": "red"}, "unknown key 'colour' in the recipe"),
])
def test_bad_recipes_are_one_line(w, tmp_path, capsys, over, says) -> None:
    path = _recipe(w, tmp_path, **over)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-slim: ") and says in err[0], err
    assert not (tmp_path / "out").exists()
