"""Token-routed (hash) layers, DeepSeek-V4's ``gate.tid2eid``: pruning sends a removed expert's table
entries to the plan's target and renumbers the table; the pruned model is the original with its table
remapped the same way; where no removed expert is named it is the original; merges send members to
their group; the streamed and in-memory rewrites write the same table in its on-disk dtype."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from core_helpers import forward_logits
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "checkpoint"))
from test_rewrite import load  # noqa: E402
from test_rewrite_merge import merge_plan_for  # noqa: E402

from moe_slim.api import apply_checkpoint  # noqa: E402
from moe_slim.errors import MoeSlimError  # noqa: E402
from moe_slim.api.plans import plan_for  # noqa: E402
from moe_slim.experts.merge.apply import apply_merge_plan  # noqa: E402
from moe_slim.experts.observe import observe  # noqa: E402
from moe_slim.experts.plan import ExpertPlan, LayerPlan  # noqa: E402
from moe_slim.experts.prune import apply_plan  # noqa: E402
from moe_slim.experts.token_table import merge_remap, remapped_table, resolve_remap  # noqa: E402
from moe_slim.families import moe_layers  # noqa: E402
from moe_slim.modeling.tiny import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = {"general": ["the cat sat on the mat and looked at 12 birds", "def f(x): return x * 2 + 1  # code",
                     "Translate: der Hund -> the dog; la mer -> the sea; 0123456789 ABCDEFGHIJ"]}
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _hash_model() -> torch.nn.Module:
    """A tiny DeepSeek-V4 whose every MoE layer is token-routed (random distinct experts per token id)."""
    return tiny_model("deepseek_v4", seed=1, mlp_layer_types=["hash_moe"] * 4)


@pytest.fixture(scope="module")
def observed() -> tuple[torch.nn.Module, object, ExpertPlan]:
    """The hash model, its statistics and a frequency plan removing half the experts (shared: observing is slow)."""
    torch.set_num_threads(1)
    model = _hash_model()
    stats = observe(model, tiny_tokenizer(), TEXTS, seq_len=16, batch_size=2)
    return model, stats, plan_for(model, stats, criterion="frequency", ratio=0.5)


def _with_tables(model: torch.nn.Module, tables: list[torch.Tensor]) -> torch.nn.Module:
    for layer, t in zip(moe_layers(model), tables):
        layer.token_table.copy_(t)
    return model


def test_remapped_table_sends_removed_experts_to_targets_and_renumbers() -> None:
    table = torch.tensor([[0, 5], [5, 3], [2, 7]], dtype=torch.int32)
    out = remapped_table(table, [0, 2, 3, 6], {1: 0, 4: 2, 5: 3, 7: 6})
    assert out.dtype == torch.int32 and out.tolist() == [[0, 2], [2, 2], [1, 3]]
    assert remapped_table(table, [0, 2, 3, 6], {1: 0, 4: 2, 5: 3, 7: 6}, renumber=False).tolist() == [[0, 3], [3, 3], [2, 6]]
    with pytest.raises(ValueError):  # a removed expert without a target
        remapped_table(table, [0, 2, 3, 6], {5: 3})


def test_a_removed_expert_without_a_target_goes_to_the_best_scored_kept_one() -> None:
    lp = LayerPlan("l", [1, 2], [0.1, 0.5, 0.9, 0.2], remap={0: 1})
    assert resolve_remap(lp, 4) == {0: 1, 3: 2}
    assert merge_remap([[3, 0], [1, 2]]) == {0: 3, 2: 1}


def test_plan_targets_are_the_nearest_kept_expert_by_mean_output(observed) -> None:
    _, stats, plan = observed
    s = stats.mix(None)
    for li, lp in enumerate(plan.layers):
        removed = sorted(set(range(8)) - set(lp.keep))
        assert sorted(lp.remap) == removed and set(lp.remap.values()) <= set(lp.keep)
        mean = s.out_sum[li] / s.count[li].clamp_min(1).unsqueeze(-1)
        for e, target in lp.remap.items():
            if s.count[li, e] > 0:
                sims = {k: float(torch.cosine_similarity(mean[e], mean[k], dim=0)) for k in lp.keep if s.count[li, k] > 0}
                assert target == max(sims, key=sims.get)
    assert ExpertPlan.from_dict(__import__("json").loads(plan.to_json())).layers[0].remap == plan.layers[0].remap


def test_pruned_model_is_the_original_with_its_table_remapped(observed) -> None:
    model, _, plan = observed
    model = copy.deepcopy(model)
    originals = [layer.token_table.clone() for layer in moe_layers(model)]
    pruned = apply_plan(copy.deepcopy(model), plan)
    for layer, lp, t in zip(moe_layers(pruned), plan.layers, originals):
        assert layer.token_table.dtype == t.dtype and int(layer.token_table.max()) < len(lp.keep)
        assert torch.equal(layer.token_table, remapped_table(t, lp.keep, lp.remap))
    before = forward_logits(model, IDS)
    _with_tables(model, [remapped_table(t, list(range(8)), lp.remap, renumber=False)
                         for t, lp in zip(originals, plan.layers)])
    remapped = forward_logits(model, IDS)
    assert (remapped - before).abs().max() > 1e-3, "the removed experts must be named by the table"
    torch.testing.assert_close(forward_logits(pruned, IDS), remapped, rtol=1e-4, atol=1e-4)


def test_removing_experts_the_table_never_names_changes_nothing() -> None:
    g = torch.Generator().manual_seed(3)
    model = _hash_model()
    tables = [torch.rand(t.shape[0], 4, generator=g).argsort(-1)[:, :2] for t in
              (layer.token_table for layer in moe_layers(model))]  # experts 0-3 only
    _with_tables(model, tables)
    plan = ExpertPlan("deepseek_v4", 8, 2, [LayerPlan(l.name, [0, 1, 2, 3], remap={4: 0, 5: 1, 6: 2, 7: 3})
                                            for l in moe_layers(model)])
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert all(torch.equal(l.token_table, t) for l, t in zip(moe_layers(pruned), tables))
    torch.testing.assert_close(forward_logits(pruned, IDS), forward_logits(model, IDS), rtol=0, atol=0)


def test_a_merge_sends_each_member_to_its_group() -> None:
    model = _hash_model()
    plan = merge_plan_for(model)
    originals = [layer.token_table.clone() for layer in moe_layers(model)]
    merged = apply_merge_plan(copy.deepcopy(model), plan)
    for layer, lp, t in zip(moe_layers(merged), plan.layers, originals):
        assert torch.equal(layer.token_table, remapped_table(t, lp.keep, merge_remap(lp.groups)))
    assert torch.isfinite(forward_logits(merged, IDS)).all()


def test_streamed_and_in_memory_write_the_remapped_table_in_its_disk_dtype(observed, tmp_path: Path) -> None:
    """DeepSeek's release stores tid2eid as int32 (transformers loads it into an int64 buffer)."""
    model, _, plan = observed
    src = tmp_path / "src"
    model.save_pretrained(str(src), max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(str(src))
    for f in src.glob("*.safetensors"):
        t = load_file(f)
        save_file({k: v.to(torch.int32) if k.endswith("tid2eid") else v for k, v in t.items()}, f, {"format": "pt"})
    plan.save(tmp_path / "plan.json")
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "streamed", max_shard_size="30KB", progress=False)
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "memory", in_memory=True)

    def tables(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in d.glob("*.safetensors") for k, v in load_file(f).items() if k.endswith("tid2eid")}

    streamed, memory, source = tables(tmp_path / "streamed"), tables(tmp_path / "memory"), tables(src)
    assert streamed.keys() == memory.keys() == source.keys() and len(source) == 4
    for li, key in enumerate(sorted(source, key=lambda k: int(k.split(".")[2]))):
        lp = plan.layers[li]
        assert streamed[key].dtype == memory[key].dtype == torch.int32
        assert torch.equal(streamed[key], memory[key])
        assert torch.equal(streamed[key], remapped_table(source[key], lp.keep, resolve_remap(lp, 8)))
    torch.testing.assert_close(forward_logits(load(tmp_path / "streamed"), IDS), forward_logits(
        apply_plan(copy.deepcopy(model), plan), IDS), rtol=1e-4, atol=1e-4)


def test_per_expert_tensors_of_hash_and_learned_layers() -> None:
    """A hash router holds its weight[E, H] (the scores that weight the table's experts) and the table; the
    learned router also a float32 correction bias[E], which pruning slices and masking covers."""
    model = tiny_model("deepseek_v4", seed=1)
    layers = moe_layers(model)
    hashed = [t == "hash_moe" for t in model.config.mlp_layer_types]
    assert any(hashed) and not all(hashed), "the tiny model should mix hash and learned layers"
    assert [layer.token_table is not None for layer in layers] == hashed
    fused = {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    assert [set(layer.per_expert()) for layer in layers] == [
        fused if h else fused | {"gate.e_score_correction_bias"} for h in hashed]
    assert layers[0].family.selection_biases == ("gate.e_score_correction_bias",)
    assert layers[0].family.scoring == "sqrtsoftplus" and layers[3].correction_bias.dtype == torch.float32


def test_a_remap_to_a_removed_expert_is_refused_in_one_line() -> None:
    model = _hash_model()
    layers = moe_layers(model)
    bad = ExpertPlan("deepseek_v4", 8, 2, [LayerPlan(l.name, [0, 1, 2, 3], remap={4: 5}) for l in layers])
    with pytest.raises(MoeSlimError, match=r"remaps model.layers.0.mlp's expert 4 to 5; a remap sends a removed"):
        apply_plan(copy.deepcopy(model), bad)
