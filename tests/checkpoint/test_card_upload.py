"""Cards ready to upload, read back with huggingface_hub: licence inherited from the source's config when
its card names none, a pipeline tag, no absolute path of the machine that wrote them, readable library
versions, no made-up model-index; eval results reach a card on push, and push is one line offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from eval_fixtures import save_checkpoint, tiny_moe, tiny_tokenizer
from huggingface_hub import ModelCard

from moe_slim.api import apply_checkpoint, merge_checkpoint
from moe_slim.checkpoint import push as push_module
from moe_slim.checkpoint.cards import with_evaluation
from moe_slim.cli import main
from moe_slim.errors import MoeSlimError
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.families import moe_layers
from moe_slim.outputs import MARKER

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESULTS = {"suite": "quick", "split": "catalog_test",
           "tasks": {"general_cloze": {"acc": 0.5, "acc_stderr": 0.1, "n": 30}},
           "metrics": {"translation/chrf": 22.42, "translation/chrf_lo": 20.0, "translation/chrf_hi": 24.5,
                       "translation/n": 90.0, "translation/copy_chrf": 23.44, "general_cloze/acc": 0.5,
                       "general_cloze/n": 30.0}}


def upload_ready(card_path: Path, machine_paths: list[Path]) -> ModelCard:
    card = ModelCard.load(card_path)
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and not card.data.eval_results
    text = card_path.read_text()
    for p in machine_paths:
        assert str(p) not in text and str(p.resolve()) not in text, p
    assert not re.search(r"`/(tmp|home|root|work)/", text)
    assert "{'" not in text and re.search(r"Libraries: python [\d.]+, moe_slim [\w.]+, torch ", text)
    return card


@pytest.fixture
def src(tmp_path: Path) -> Path:
    tok = tiny_tokenizer()
    model = tiny_moe(tok)
    model.config.license = "apache-2.0"  # the source's card names none: its config does
    path = save_checkpoint(model, tok, tmp_path / "src")
    layers = moe_layers(model)
    ExpertPlan("qwen3_moe", layers[0].num_experts, 2,
               [LayerPlan(l.name, list(range(layers[0].num_experts // 2))) for l in layers]).save(tmp_path / "plan.json")
    return path


def test_prune_and_merge_cards_are_upload_ready(src: Path, tmp_path: Path) -> None:
    for how in ({}, {"in_memory": True}):
        out = tmp_path / f"pruned{len(how)}"
        apply_checkpoint(src, tmp_path / "plan.json", out, progress=False, **how)
        card = upload_ready(out / "README.md", [src, tmp_path])
        assert "moe-slim apply src --plan plan.json" in card.text
    merge_checkpoint(src, tmp_path / "merged", method="hc-smoe", ratio=0.5, seq_len=16, batch_size=2, max_tokens=64,
                     calib={"general": ["the quick brown fox jumps over the lazy dog"] * 4}, device="cpu")
    upload_ready(tmp_path / "merged" / "README.md", [src, tmp_path])


def test_results_fill_the_card_evaluation_with_n_and_intervals() -> None:
    card = with_evaluation("# model\n\n## Evaluation\n\nold\n\n## Use\n\nx\n", RESULTS)
    assert "old" not in card and card.endswith("## Use\n\nx\n")
    assert "| translation/chrf | 22.42 | [20.00, 24.50] | 90 |" in card
    assert "| general_cloze/acc | 0.5 | [0.304, 0.696] | 30 |" in card
    assert "Copying the source scores chrF 23.44" in card and "split `catalog_test`" in card


def test_push_is_one_line_offline_and_uploads_the_card_with_the_scores(src: Path, tmp_path: Path, monkeypatch,
                                                                       capsys) -> None:
    out = tmp_path / "pruned"
    apply_checkpoint(src, tmp_path / "plan.json", out, progress=False)
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert main(["push", str(out), "me/pruned", "--results", str(tmp_path / "results.json")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("moe-slim: pushing to me/pruned needs the Hugging Face hub, which is offline here")
    with pytest.raises(MoeSlimError, match="not a Hub repository id"):
        push_module.push_to_hub(out, "no-owner")

    sent: dict = {}

    class FakeApi:
        def __init__(self, token=None) -> None:
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False) -> None:
            sent["repo"] = (repo_id, private)

        def create_commit(self, repo_id, operations, commit_message=""):
            sent["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
            return "https://huggingface.co/me/pruned/commit/1"

    import huggingface_hub

    monkeypatch.setattr(push_module, "hub_unavailable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_module.push_to_hub(out, "me/pruned", results=tmp_path / "results.json", private=True).endswith("/1")
    assert sent["repo"] == ("me/pruned", True)
    assert MARKER not in sent["files"] and "model.safetensors" in sent["files"] and "plan.json" in sent["files"]
    assert "| translation/chrf | 22.42 | [20.00, 24.50] | 90 |" in sent["files"]["README.md"].decode()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before, "the folder itself is not changed"


def test_slim_dense_card_names_the_probe_plan_it_does_not_hold(src: Path, tmp_path: Path) -> None:
    from moe_slim.checkpoint.cards import dense_card
    from moe_slim.modeling.loading import load_model

    model, _ = load_model(src)
    prov = {"method": "probscale", "plan": str(tmp_path / "probe" / "plan.json"), "keep": {"layers": [0]},
            "layers_before": {"layers": 2}, "params_before": 10, "params_after": 5, "budget": {"spec": "x2"}}
    (tmp_path / "card.md").write_text(dense_card(source=str(src), provenance=prov, model=model, causal=True))
    card = upload_ready(tmp_path / "card.md", [src, tmp_path])
    assert "`moe-slim slim-dense src --plan PLAN --out OUT`" in card.text and "(`plan.json`, written by" in card.text
