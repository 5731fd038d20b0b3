"""Merge plans applied at size (one MoE layer in memory at a time, streamed from the shards): the
same tensors as the in-memory replay on every family, the source dtype kept, the source untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_slim.experts.merge.plan import MergeLayerPlan, MergePlan, _sha
from moe_slim.experts.merge.runner import ExpertRunner
from moe_slim.families import family_of, moe_layers
from moe_slim.modeling.shards import ShardedCheckpoint
from moe_slim.modeling.tiny import TINY_FAMILIES, tiny_model

from test_rewrite import file_hashes, save_sharded, streamed_and_in_memory_agree

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def merge_plan_for(model: torch.nn.Module, seed: int = 0) -> MergePlan:
    """Pairs of neighbouring experts (within DeepSeek's router groups), random weights and neuron orders."""
    g = torch.Generator().manual_seed(seed)
    fam = family_of(model)
    layers = moe_layers(model)
    E = layers[0].num_experts
    plans, perms = [], {}
    for li, layer in enumerate(layers):
        groups = [[e + 1, e] if (e // 2 + li) % 2 else [e, e + 1] for e in range(0, E, 2)]
        weights = []
        for _ in groups:
            w = float(torch.rand((), generator=g)) * 0.6 + 0.2
            weights.append([w, 1.0 - w])
        inter = ExpertRunner(layer).n
        p = torch.stack([torch.randperm(inter, generator=g) for _ in range(E)])
        perms[li] = p
        plans.append(MergeLayerPlan(layer.name, [grp[0] for grp in groups], [], groups, weights, _sha(p)))
    return MergePlan(fam.name, E, fam.top_k(model.config), plans, "merge", {"method": "test"}, permutations=perms)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_merge_plan_streamed_equals_in_memory_on_every_family(model_type: str, tmp_path: Path) -> None:
    src = save_sharded(model_type, tmp_path / "src", dtype=torch.bfloat16)
    plan = merge_plan_for(tiny_model(model_type))
    (tmp_path / "plan").mkdir()
    plan.write_files(tmp_path / "plan")
    before = file_hashes(src)
    streamed, _ = streamed_and_in_memory_agree(src, tmp_path / "plan" / "plan.json", tmp_path, before)
    stored = {ShardedCheckpoint(tmp_path / "streamed").entry(k).dtype for k in ShardedCheckpoint(tmp_path / "streamed").keys}
    assert stored == {"BF16"}, "every tensor keeps the source dtype"
    assert all(l.num_experts == 4 for l in moe_layers(streamed))
    assert (tmp_path / "streamed" / "merge_permutations.safetensors").is_file()
    assert "merged with moe_slim" in (tmp_path / "streamed" / "README.md").read_text()
