"""What a derived checkpoint says about itself: parameter counts are transformers' own
(``num_parameters()``, a tied lm_head counted once) on every path, and the source's own metrics
and training logs, which describe the unpruned model, are not carried over."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from moe_slim.api import apply_checkpoint
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.families import moe_layers
from moe_slim.modeling.tiny import save_tiny, tiny_model

SOURCE_LOGS = ("metrics.json", "training.json")


@pytest.fixture
def tied(tmp_path: Path) -> tuple[Path, Path]:
    src = save_tiny("qwen3_moe", tmp_path / "src", tie_word_embeddings=True)
    for name in SOURCE_LOGS:
        (src / name).write_text(json.dumps({"about": "the unpruned model"}))
    layers = moe_layers(tiny_model("qwen3_moe"))
    ExpertPlan("qwen3_moe", layers[0].num_experts, 2,
               [LayerPlan(l.name, [0, 2, 5, 7]) for l in layers]).save(tmp_path / "plan.json")
    return src, tmp_path / "plan.json"


@pytest.mark.parametrize("in_memory", [False, True])
def test_counts_are_num_parameters_and_source_logs_stay_behind(tied, tmp_path: Path, in_memory: bool) -> None:
    src, plan_path = tied
    source = AutoModelForCausalLM.from_pretrained(str(src))
    assert source.lm_head.weight is source.model.embed_tokens.weight
    out = tmp_path / "out"
    plan = apply_checkpoint(src, plan_path, out, in_memory=in_memory, progress=False)
    after = AutoModelForCausalLM.from_pretrained(str(out)).num_parameters()
    assert (plan.info["params_before"], plan.info["params_after"]) == (source.num_parameters(), after)
    written = ExpertPlan.load(out / "plan.json").info
    assert (written["params_before"], written["params_after"]) == (source.num_parameters(), after)
    card = (out / "README.md").read_text()
    assert f"{source.num_parameters():,} before, {after:,} after" in card
    fewer = float(re.search(r"\(([\d.]+)% fewer\)", card).group(1))
    assert fewer == round(100 * (1 - after / source.num_parameters()), 1)
    for name in SOURCE_LOGS:
        assert not (out / name).exists(), name
