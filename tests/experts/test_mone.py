"""MoNE: output sums as sufficient statistics, novices that are exact where their constant is, the
expert-substitution checkpoint and the nearest standard one (issue 19)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from core_helpers import forward_logits
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_slim.api import plan_for
from moe_slim.checkpoint.substitution import check_substitution, substitution_config
from moe_slim.cli import main
from moe_slim.errors import MoeSlimError
from moe_slim.experts.merge.runner import ExpertRunner
from moe_slim.experts.mone import install_novices, novice_plan, set_novices
from moe_slim.experts.observe import observe
from moe_slim.experts.prune import apply_plan
from moe_slim.experts.stats import RouterStats
from moe_slim.families import moe_layers
from moe_slim.modeling.dispatch import prepare_model
from moe_slim.modeling.tiny import TINY_FAMILIES, save_tiny, tiny_model, tiny_tokenizer

TEXTS = {"general": ["the quick brown fox jumps over the lazy dog"], "code": ["def f(x):\n    return x * 2"]}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _block(layer, x: torch.Tensor) -> torch.Tensor:
    out = layer.block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("mt", [*TINY_FAMILIES, "longcat_flash"])  # LongCat: zero experts are never novices
def test_novices_with_their_exact_output_on_a_constant_input_change_nothing(mt: str) -> None:
    model = prepare_model(tiny_model(mt, seed=1))
    layer = moe_layers(model)[0]
    x0 = torch.randn(layer.router_weight.shape[-1], generator=torch.Generator().manual_seed(0))
    x = x0.repeat(5, 1).unsqueeze(0)
    E = layer.num_experts
    novice = torch.ones(E, dtype=torch.bool)
    novice[0] = False  # every expert but one: the router picks some novice, whatever its top-k
    with torch.no_grad():
        original = _block(layer, x)
        runner = ExpertRunner(layer)
        exact = torch.stack([runner.output(e, x0[None])[0].float() for e in range(E)])
        set_novices(layer, novice, torch.zeros_like(exact))
        wrong = _block(layer, x)
        set_novices(layer, novice, exact)
        torch.testing.assert_close(_block(layer, x), original, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(wrong, original)  # the novices' routes did reach their constants


def test_output_sums_are_sums_per_domain_and_old_stats_still_load(tmp_path: Path) -> None:
    model = prepare_model(tiny_model("qwen3_moe", seed=2))
    stats = observe(model, tiny_tokenizer(), TEXTS, seq_len=48, batch_size=1, pack=False, samples=10_000)
    layer = moe_layers(model)[1]
    runner = ExpertRunner(layer)
    for d in TEXTS:  # every token is in the sample: the sums are the routed outputs' sums
        x, route = stats.samples.get(d, 1, "x"), stats.samples.get(d, 1, "route")
        assert x.shape[0] == int(stats.tokens(d)[1])
        for e in range(layer.num_experts):
            rows = route[:, e] > 0
            y = runner.output(e, x[rows]).double()
            torch.testing.assert_close(stats.domains[d]["out_sum"][1, e], y.sum(0), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(stats.domains[d]["out_sq_sum"][1, e], y.pow(2).sum(), rtol=1e-4, atol=1e-5)
    mixed = stats.mix(None).out_sum
    torch.testing.assert_close(mixed, stats.domains["general"]["out_sum"] + stats.domains["code"]["out_sum"])
    both = stats + stats
    torch.testing.assert_close(both.domains["code"]["out_sum"], 2 * stats.domains["code"]["out_sum"])
    # statistics written before the output sums load and score as before; MoNE says what is missing
    for t in stats.domains.values():
        t.pop("out_sum"), t.pop("out_sq_sum")
    stats.save(tmp_path / "old")
    old = RouterStats.load(tmp_path / "old")
    assert not old.has_outputs()
    plan_for(model, old, criterion="reap", ratio=0.5)
    with pytest.raises(MoeSlimError, match="observe again"):
        plan_for(model, old, criterion="mone", ratio=0.5)


def _saved_with_stats(tmp_path: Path) -> tuple[Path, torch.nn.Module, RouterStats]:
    """A tiny Qwen3-MoE saved to TMP/model, loaded, and its statistics saved to TMP/stats."""
    src = tmp_path / "model"
    save_tiny("qwen3_moe", src, seed=3)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    stats = observe(model, tiny_tokenizer(), TEXTS, seq_len=48, batch_size=2)
    stats.save(tmp_path / "stats")
    return src, model, stats


def test_mone_in_memory_and_both_checkpoints(tmp_path: Path, capsys) -> None:
    src, model, stats = _saved_with_stats(tmp_path)
    plan = plan_for(model, stats, criterion="mone", ratio=0.5)
    nplan = novice_plan(plan, stats)
    mone = install_novices(copy.deepcopy(model), nplan)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    pruned = apply_plan(copy.deepcopy(model), plan)
    out = forward_logits(mone, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, forward_logits(pruned, ids))
    # the expert-substitution checkpoint: vLLM's fields, compact experts under their logical ids, constants
    assert main(["mone", str(src), "--stats", str(tmp_path / "stats"), "--ratio", "0.5", "--out",
                 str(tmp_path / "sub")]) == 0
    assert "plain transformers cannot load it" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "sub" / "config.json").read_text())
    sub = cfg["compression_config"]["transform_config"]["expert_substitution"]
    assert sub["version"] == 1 and sub["router_semantics"]["preserve_router_weights"] is True
    target = sub["targets"]["model.layers.0.mlp.experts"]
    assert target["num_logical_experts"] == 8 and target["weight_layout"] == "compact_retained_experts"
    novices0 = sorted(set(range(8)) - set(plan.layers[0].keep))
    assert sorted(int(e) for e in target["replacements"]) == novices0
    values = load_file(str(tmp_path / "sub" / "novices.safetensors"))
    name = target["replacements"][str(novices0[0])]["tensors"]["value"]
    torch.testing.assert_close(values[name].float(), nplan.values[0][novices0[0]], rtol=1e-3, atol=1e-6)
    check_substitution(sub)  # the written block follows the format's rules
    weights = load_file(str(tmp_path / "sub" / "model.safetensors"))
    stored = sorted({int(k.split(".")[5]) for k in weights if k.startswith("model.layers.0.mlp.experts.")})
    assert stored == sorted(plan.layers[0].keep)
    assert weights["model.layers.0.mlp.gate.weight"].shape[0] == 8  # the router keeps every row
    # --standard: the nearest standard checkpoint, which is the MoNE-ranked prune
    assert main(["mone", str(src), "--stats", str(tmp_path / "stats"), "--ratio", "0.5", "--standard", "--out",
                 str(tmp_path / "std")]) == 0
    std = AutoModelForCausalLM.from_pretrained(tmp_path / "std", dtype=torch.float32)
    torch.testing.assert_close(forward_logits(std, ids), forward_logits(pruned, ids), rtol=1e-4, atol=1e-5)


def test_a_ratio_that_rounds_to_no_novice_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    src, model, stats = _saved_with_stats(tmp_path)
    for extra in ([], ["--standard"]):
        assert main(["mone", str(src), "--stats", str(tmp_path / "stats"), "--ratio", "0.01", "--out",
                     str(tmp_path / "sub"), *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "rounds to no novice" in err[0], err
        assert not (tmp_path / "sub").exists()
    # the block itself: a layer without novices gets no target, and no novice at all is no valid block
    nplan = novice_plan(plan_for(model, stats, criterion="mone", ratio=0.5), stats)
    for lp in nplan.plan.layers[1:]:
        lp.keep = list(range(nplan.plan.num_experts))
    block = substitution_config(["a", "b"], nplan)
    assert list(block["targets"]) == ["a"]
    check_substitution(block)
    nplan.plan.layers[0].keep = list(range(nplan.plan.num_experts))
    with pytest.raises(MoeSlimError, match="targets must name at least one"):
        check_substitution(substitution_config(["a", "b"], nplan))
    with pytest.raises(MoeSlimError, match="replacements must not be empty"):
        check_substitution({**block, "targets": {"a": {**block["targets"]["a"], "replacements": {}}}})


@pytest.mark.parametrize("standard", [False, True], ids=["substitution", "standard"])
def test_mone_writes_every_tensor_in_its_own_source_dtype(tmp_path: Path, standard: bool) -> None:
    """A source with F32 routers beside bf16 weights (as DeepSeek-V3 stores them): MoNE keeps both dtypes, and
    novices are written as their experts are (before, every tensor took the most common dtype)."""
    src, model, stats = _saved_with_stats(tmp_path)
    sd = {k: (v if k.endswith("mlp.gate.weight") else v.to(torch.bfloat16)) for k, v in model.state_dict().items()
          if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "mone"
    args = ["mone", str(src), "--stats", str(tmp_path / "stats"), "--ratio", "0.5", "--out", str(out)]
    assert main(args + (["--standard"] if standard else [])) == 0
    written: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(str(f)))
    routers = [k for k in written if k.endswith("mlp.gate.weight")]
    assert routers and all(written[k].dtype == torch.float32 for k in routers)
    assert {v.dtype for k, v in written.items() if k not in routers} == {torch.bfloat16}
