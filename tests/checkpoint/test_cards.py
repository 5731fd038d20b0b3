"""Checkpoints ready for the Hub: card metadata through huggingface_hub (base model, inherited licence),
a usage snippet with the prompt format, generation that stops at <|end|>, no machine-local tokenizer keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from eval_fixtures import save_checkpoint, tiny_moe, tiny_tokenizer
from huggingface_hub import ModelCard

from moe_slim.api import apply_checkpoint
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.families import moe_layers
from moe_slim.prompts import END_TAG


def _source(tmp_path: Path, name: str = "src") -> Path:
    tok = tiny_tokenizer()
    model = tiny_moe(tok)
    path = save_checkpoint(model, tok, tmp_path / name)
    layers = moe_layers(model)
    ExpertPlan("qwen3_moe", layers[0].num_experts, 2,
               [LayerPlan(l.name, list(range(layers[0].num_experts // 2))) for l in layers]).save(tmp_path / "plan.json")
    return path


def test_derived_checkpoints_carry_card_metadata_usage_and_stop_at_end(tmp_path: Path) -> None:
    src = _source(tmp_path)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/parent-moe\n---\n# parent\n")
    tc = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tc, "is_local": True, "local_files_only": True}))
    for how in ({}, {"in_memory": True}):
        out = tmp_path / f"out{len(how)}"
        apply_checkpoint(src, tmp_path / "plan.json", out, progress=False, **how)
        card = ModelCard.load(out / "README.md")
        assert card.data.license == "apache-2.0" and card.data.base_model == "org/parent-moe"
        assert "moe_slim" in card.data.tags and card.data.library_name == "transformers"
        assert "<|en|>" in card.text and "stops at <|end|>" in card.text and f"`{src.resolve()}`" not in card.text
        assert "org/parent-moe" in card.text  # the source is named by the Hub model it derives from
        saved = json.loads((out / "tokenizer_config.json").read_text())
        assert "is_local" not in saved and "local_files_only" not in saved
        end_id = next(t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]
                      if t["content"] == END_TAG)
        eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
        assert end_id in (eos if isinstance(eos, list) else [eos])


def test_a_hub_snapshot_source_is_the_base_model(tmp_path: Path) -> None:
    cache = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "abc123"
    cache.parent.mkdir(parents=True)
    shutil.copytree(_source(tmp_path), cache)
    apply_checkpoint(cache, tmp_path / "plan.json", tmp_path / "out", progress=False)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "acme/tiny-moe" and "`acme/tiny-moe`" in card.text
