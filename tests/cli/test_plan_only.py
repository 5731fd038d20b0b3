"""Plans without checkpoints: any budget from the command line (global, per-layer counts), evaluated in
memory with ``eval --plan``; a counts file needs no --ratio; merges write their plan and permutations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from eval_fixtures import write_fixture_data

from moe_slim.cli import main
from moe_slim.evals.run import evaluate
from moe_slim.experts.merge.apply import apply_merge_plan
from moe_slim.experts.merge.plan import MergePlan
from moe_slim.experts.plan import ExpertPlan
from moe_slim.experts.prune import apply_plan
from moe_slim.modeling.loading import load_model
from moe_slim.modeling.tiny import save_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("planonly")
    model = save_tiny("qwen3_moe", root / "model", seed=2, max_position_embeddings=1024)
    data = write_fixture_data(root / "data", n_per_domain=4)
    calib = root / "c.jsonl"
    calib.write_text("".join(json.dumps({"text": f"words and more words {i} " * 3}) + "\n" for i in range(30)))
    assert main(["observe", str(model), "--calib", f"general={calib}", "--out", str(root / "stats"), "--seq-len", "32",
                 "--samples", "256", "--quiet", "--no-layerwise"]) == 0
    return {"root": root, "model": model, "data": data, "stats": root / "stats"}


def test_global_budget_plan_is_written_and_evaluated_in_memory(w, tmp_path, capsys) -> None:
    out = tmp_path / "global"
    assert main(["prune", str(w["model"]), "--stats", str(w["stats"]), "--ratio", "0.5", "--budget", "global",
                 "--plan-only", "--out", str(out)]) == 0
    plan = ExpertPlan.load(out / "plan.json")
    assert sum(plan.kept_counts) == 8 and sorted(out.iterdir()) == [out / ".moe_slim", out / "plan.json"]
    model, _ = load_model(w["model"])
    before = model.num_parameters()
    apply_plan(model, plan)  # the counts printed are those of the model the plan makes
    assert f"parameters {before:,} -> {model.num_parameters():,}" in capsys.readouterr().out
    res = tmp_path / "r.json"
    assert main(["eval", str(w["model"]), "--plan", str(out / "plan.json"), "--tasks", "perplexity", "--limit", "2",
                 "--data-dir", str(w["data"]), "--out", str(res), "--quiet"]) == 0
    results = json.loads(res.read_text())
    assert results["plan"]["kept_per_layer"] == plan.kept_counts
    model, tok = load_model(w["model"])
    apply_plan(model, plan)
    direct = evaluate(model, tok, "quick", tasks=["perplexity"], limit=2, data_dir=w["data"], hash_weights=False)
    assert results["metrics"]["perplexity/ppl"] == pytest.approx(direct["metrics"]["perplexity/ppl"], rel=1e-6)


def test_a_counts_file_needs_no_ratio(w, tmp_path) -> None:
    counts = tmp_path / "counts.yaml"
    counts.write_text(yaml.safe_dump({"model.layers.0.mlp": 6, "model.layers.1.mlp": 3}))
    out = tmp_path / "counts"
    assert main(["prune", str(w["model"]), "--stats", str(w["stats"]), "--budget", str(counts), "--plan-only",
                 "--out", str(out)]) == 0
    assert ExpertPlan.load(out / "plan.json").kept_counts == [6, 3]


def test_a_uniform_budget_without_ratio_is_one_line(w, tmp_path, capsys) -> None:
    assert main(["prune", str(w["model"]), "--stats", str(w["stats"]), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "moe-slim: a uniform budget needs --ratio"


def test_merge_plan_only_writes_plan_and_permutations_and_replays(w, tmp_path, capsys) -> None:
    out = tmp_path / "merge-plan"
    assert main(["merge", str(w["model"]), "--stats", str(w["stats"]), "--ratio", "0.5", "--method", "ream",
                 "--max-tokens", "256", "--plan-only", "--out", str(out), "--quiet", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (out / "plan.json").is_file() and (out / "merge_permutations.safetensors").is_file()
    # the parameter counts of the checkpoint the plan would make (once printed as "N -> 0")
    model, _ = load_model(w["model"])
    before = model.num_parameters()
    apply_merge_plan(model, MergePlan.load(out / "plan.json"))
    assert (printed["params_before"], printed["params_after"]) == (before, model.num_parameters())
    assert not (out / "config.json").exists()
    res = tmp_path / "r.json"
    assert main(["eval", str(w["model"]), "--plan", str(out / "plan.json"), "--tasks", "perplexity", "--limit", "2",
                 "--data-dir", str(w["data"]), "--out", str(res), "--quiet"]) == 0
    assert json.loads(res.read_text())["plan"]["kind"] == "merge"
