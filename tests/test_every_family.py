"""Every MoE family of the installed transformers, enumerated from transformers itself.

For each model type with an ``*Experts`` module (:func:`moe_slim.families.catalog.moe_model_types`),
a tiny random model is built from its default config with every size shrunk, and three things are
checked: observe then prune equals the original with the removed experts masked out of its routing;
the streamed rewrite equals the in-memory one tensor for tensor; a merge plan writes a checkpoint
that loads. The routing moe_slim re-derives (softmax or sigmoid scores) is checked against what the
router really handed the experts. A family transformers adds later fails here until it passes or is
listed in the family table as refused (or untested) with a reason.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from core_helpers import experts_masked, forward_logits
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).parent / "checkpoint"))
from test_rewrite import load, save_sharded  # noqa: E402
from test_rewrite_merge import merge_plan_for  # noqa: E402

from moe_slim.api import apply_checkpoint  # noqa: E402
from moe_slim.api.plans import plan_for  # noqa: E402
from moe_slim.errors import MoeSlimError  # noqa: E402
from moe_slim.experts.observe import observe  # noqa: E402
from moe_slim.experts.prune import apply_plan  # noqa: E402
from moe_slim.families import REFUSED, family_of, moe_layers, non_text_parts  # noqa: E402
from moe_slim.families.catalog import moe_model_types  # noqa: E402
from moe_slim.families.table import UNTESTED  # noqa: E402
from moe_slim.modeling.loading import load_config  # noqa: E402
from moe_slim.modeling.ondisk import DiskLayout, meta_model  # noqa: E402
from moe_slim.modeling.shards import ShardedCheckpoint  # noqa: E402
from moe_slim.modeling.tiny import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TYPES = list(moe_model_types())
TEXTS = {"general": ["the cat sat on the mat and looked at 12 birds", "def f(x): return x * 2 + 1  # code",
                     "Translate: der Hund -> the dog; la mer -> the sea"]}


def test_the_enumeration_finds_the_known_moe_families() -> None:
    assert {"qwen3_moe", "mixtral", "qwen3_next", "deepseek_v3", "switch_transformers"} <= set(TYPES)
    assert set(REFUSED) | set(UNTESTED) <= set(TYPES) | {"nllb_moe"}, "the table lists a model type transformers lacks"


def _routing_matches(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """The weights the experts were called with are the family's scores of the chosen experts, up to a
    per-token factor (renormalisation and scaling): softmax vs sigmoid is re-derived correctly."""
    layers = moe_layers(model)
    if layers[0].family.layout != "fused" or not layers[0].family.exact_scores:
        return
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    logits: list[torch.Tensor] = []
    hooks = []
    def router_hook(m: torch.nn.Module, a: tuple, o: object, layer=None) -> None:
        logits.append(layer.router_logits(o))
        if layer.family.routing is not None:  # experts called with router-scaled inputs: routing is the router's
            seen.append((layer, *layer.family.routing(m, o)))

    for layer in layers:
        hooks.append(layer.router.register_forward_hook(lambda m, a, o, layer=layer: router_hook(m, a, o, layer)))
        if layer.family.routing is None:
            hooks.append(layer.experts.register_forward_pre_hook(
                lambda m, a, layer=layer: seen.append((layer, a[1], a[2]))))
    try:
        forward_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(logits) > 0
    for (layer, index, weights), lg in zip(seen, logits):
        scores = layer.router_scores(lg).gather(1, index.reshape(len(lg.reshape(-1, lg.shape[-1])), -1))
        ratio = weights.float().reshape(scores.shape) / scores
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-5,
                                   msg=f"{layer.name}: routing weights are not {layer.family.scoring} scores")


@pytest.mark.parametrize("model_type", TYPES)
def test_every_moe_family(model_type: str, tmp_path: Path) -> None:
    if model_type in REFUSED:
        with pytest.raises(MoeSlimError, match=f"'{model_type}' is not supported: .+"):
            family_of(AutoConfig.for_model(model_type))
        return
    if model_type in UNTESTED:
        with pytest.raises(Exception):  # noqa: B017 - the day it passes, this family must be listed as tested
            _end_to_end(model_type, tmp_path)
        return
    _end_to_end(model_type, tmp_path)


def _end_to_end(model_type: str, tmp_path: Path) -> None:
    model = tiny_model(model_type, seed=1)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    _routing_matches(model, ids)
    # observe -> prune equals the masked original
    stats = observe(model, tiny_tokenizer(), TEXTS, seq_len=16, batch_size=2)
    plan = plan_for(model, stats, criterion="frequency", ratio=0.5)
    with experts_masked(model, plan):
        masked = forward_logits(model, ids)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert (masked - forward_logits(model, ids)).abs().max() > 1e-4, "the plan must change the model"
    torch.testing.assert_close(forward_logits(pruned, ids), masked, rtol=1e-4, atol=1e-4)
    # the streamed rewrite equals the in-memory one, tensor for tensor
    src = save_sharded(model_type, tmp_path / "src")
    ref = tiny_model(model_type)
    plan = plan_for(ref, observe(ref, tiny_tokenizer(), TEXTS, seq_len=16, batch_size=2), criterion="frequency", ratio=0.5)
    plan.save(tmp_path / "plan.json")
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "streamed", max_shard_size="30KB", progress=False)
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "memory", in_memory=True)
    streamed = load(tmp_path / "streamed")
    a, b = streamed.state_dict(), load(tmp_path / "memory").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    if non_text_parts(ref):  # an image-text model (Mistral-4's image-text class is its causal LM)
        _whole_model_written_back(ref, streamed, src, [tmp_path / "streamed", tmp_path / "memory"])
    # a merge writes a checkpoint that loads
    mplan = merge_plan_for(ref)
    (tmp_path / "mplan").mkdir()
    mplan.write_files(tmp_path / "mplan")
    apply_checkpoint(src, tmp_path / "mplan" / "plan.json", tmp_path / "merged", progress=False)
    merged = load(tmp_path / "merged")
    assert all(layer.num_experts == mplan.num_experts // 2 for layer in moe_layers(merged))
    assert torch.isfinite(forward_logits(merged, ids)).all()


def _whole_model_written_back(ref: torch.nn.Module, streamed: torch.nn.Module, src: Path, outs: list[Path]) -> None:
    """An image-text checkpoint is written back whole: loaded as the source's class, the expert count updated in
    its nested text config; both outputs hold the same on-disk names; every tensor outside the MoE blocks (the
    vision tower, projector, attention, embeddings) is the source's, byte for byte."""
    assert type(streamed) is type(ref) and hasattr(streamed.config, "text_config")
    fam = family_of(streamed)
    assert fam.num_experts(streamed.config) == fam.num_experts(ref.config) // 2 == moe_layers(streamed)[0].num_experts
    assert getattr(streamed.config.text_config, fam.n_experts_key) == moe_layers(streamed)[0].num_experts
    ckpt = ShardedCheckpoint(src)
    layout = DiskLayout(meta_model(load_config(src)), ckpt.keys)
    kept = [k for k, d in layout.tensors.items() if d.role == "other"]
    language = next(name for name, m in ref.named_modules() if m is ref.get_decoder())
    assert any(not layout.tensors[k].memory_key.startswith(f"{language}.") for k in kept), "no vision tensor on disk"
    written = [ShardedCheckpoint(o) for o in outs]
    assert set(written[0].keys) == set(written[1].keys)
    for out in written:
        for k in kept:
            assert out.entry(k).dtype == ckpt.entry(k).dtype and out.entry(k).shape == ckpt.entry(k).shape, k
            assert b"".join(out.iter_bytes(k)) == b"".join(ckpt.iter_bytes(k)), k


def test_readme_table_is_the_catalog() -> None:
    from moe_slim.families.catalog import markdown_table

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- families:start -->\n", 1)[1].split("\n<!-- families:end -->", 1)[0]
    assert block == markdown_table(), "regenerate the README table from moe_slim.families.catalog.markdown_table()"
