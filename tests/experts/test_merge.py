"""Expert merging: exact on duplicates and permuted copies, shrinking checkpoints on every family, bad input."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from core_helpers import duplicate_experts, forward_logits
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from moe_slim.checkpoint.save import save_checkpoint
from moe_slim.cli import main
from moe_slim.errors import MoeSlimError
from moe_slim.experts.batches import make_batches
from moe_slim.experts.merge.align import align, ream_cost, weight_matching_cost
from moe_slim.experts.merge.apply import apply_merge_plan, merge_layer
from moe_slim.experts.merge.driver import merge_model
from moe_slim.experts.merge.features import _gather_layer
from moe_slim.experts.merge.methods import METHODS
from moe_slim.experts.merge.plan import MergePlan
from moe_slim.experts.merge.runner import ExpertRunner
from moe_slim.experts.merge.tensors import (
    expert_tensors,
    permute_neurons,
    weight_features,
)
from moe_slim.experts.observe import observe
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.experts.prune import apply_plan
from moe_slim.experts.stats import RouterStats
from moe_slim.families import family_of, moe_layers
from moe_slim.modeling.dispatch import prepare_model
from moe_slim.modeling.tiny import TINY_FAMILIES, save_tiny, tiny_model, tiny_tokenizer

TEXTS = {
    "general": ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, they said"],
    "code": ["def f(x):\n    return x * 2", "for i in range(10): print(i)"],
}
PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7]]  # valid within DeepSeek's two router groups of four


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _observe(model: torch.nn.Module, samples: int = 96) -> RouterStats:
    return observe(model, tiny_tokenizer(), TEXTS, seq_len=48, batch_size=2, samples=samples)


@functools.lru_cache(maxsize=None)
def _family_setup(mt: str) -> tuple[torch.nn.Module, RouterStats]:
    model = prepare_model(tiny_model(mt, seed=1))
    return model, _observe(model)


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))


# -- samples ----------------------------------------------------------------------------------------


def test_samples_are_deterministic_ignore_padding_and_recompute_the_layer(tmp_path: Path) -> None:
    model = prepare_model(tiny_model("qwen3_moe", seed=2))
    tok = tiny_tokenizer()
    texts = {"g": TEXTS["general"] + TEXTS["code"]}
    one = observe(model, tok, texts, seq_len=48, batch_size=1, pack=False, samples=40)
    padded = observe(model, tok, texts, seq_len=48, batch_size=3, pack=False, samples=40)
    for f in ("x", "logits", "route"):  # the same tokens (padding rounds differently, nothing more)
        torch.testing.assert_close(one.samples.get("g", 1, f), padded.samples.get("g", 1, f), rtol=1e-4, atol=1e-5)
    assert torch.equal(one.samples.get("g", 1, "route") > 0, padded.samples.get("g", 1, "route") > 0)
    again = observe(model, tok, texts, seq_len=48, batch_size=1, pack=False, samples=40)
    assert torch.equal(again.samples.get("g", 1, "x"), one.samples.get("g", 1, "x"))
    assert one.samples.count("g", 1) == 40 < one.tokens("g")[1]
    # the sample is faithful: the MoE block on the sampled inputs is the route-weighted sum of expert outputs
    layer = moe_layers(model)[1]
    x, route = one.samples.get("g", 1, "x"), one.samples.get("g", 1, "route")
    runner = ExpertRunner(layer)
    recomputed = sum(route[:, e, None] * runner.output(e, x) for e in range(layer.num_experts))
    with torch.no_grad():
        torch.testing.assert_close(layer.block(x.unsqueeze(0))[0], recomputed, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one.samples.get("g", 1, "logits"), layer.router(x)[0], rtol=1e-5, atol=1e-6)
    # saved with the stats, atomically, read back lazily; stats of two runs keep a combined sample
    one.save(tmp_path / "s")
    back = RouterStats.load(tmp_path / "s")
    assert (tmp_path / "s" / "samples.safetensors").exists()
    assert torch.equal(back.samples.get("g", 1, "x"), x)
    both = back + observe(model, tok, {"g": ["more text about other things"]}, seq_len=48, samples=40)
    assert both.samples.count("g", 0) == 40
    mixed = one.samples.take(0, {"g": 1}, max_tokens=16)
    assert mixed["x"].shape == (16, 32) and mixed["route"].shape == (16, 8)


# -- exactness ---------------------------------------------------------------------------------------


def _duplicate_pairs(model: torch.nn.Module) -> None:
    """Make the second expert of each pair a copy of the first, routed by the first's row scaled by 0.05."""
    duplicate_experts(model, PAIRS)


def _never_routed(stats: RouterStats, experts: list[int]) -> None:
    """Statistics in which ``experts`` were never selected (the copies: saliency and frequency 0)."""
    for d in stats.domains.values():
        for f in ("count", "weight_sum", "norm_sum", "wnorm_sum", "rwnorm_sum"):
            d[f][:, experts] = 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mt", ["qwen3_moe", "deepseek_v3", "gpt_oss", "nllb-moe"])
def test_identical_experts_merge_into_what_pruning_the_copies_gives(mt: str, method: str) -> None:
    model = prepare_model(tiny_model(mt, seed=1))
    _duplicate_pairs(model)
    stats = _observe(model)
    _never_routed(stats, [d for _, d in PAIRS])
    merged = copy.deepcopy(model)
    plan = merge_model(merged, stats, method, 0.5, group_size=2)
    for lp in plan.layers:
        assert sorted(sorted(g) for g in lp.groups) == PAIRS, (lp.name, lp.groups)
    fam = family_of(model)
    prune = ExpertPlan(fam.name, 8, fam.top_k(model.config), [LayerPlan(l.name, l.keep) for l in plan.layers])
    pruned = apply_plan(copy.deepcopy(model), prune)
    ids = _ids()
    torch.testing.assert_close(forward_logits(merged, ids), forward_logits(pruned, ids), rtol=1e-5, atol=1e-5)
    assert all(l.num_experts == 4 for l in moe_layers(merged))


@pytest.mark.parametrize("mt", ["qwen3_moe", "gpt_oss", "switch_transformers", "nllb-moe"])
def test_alignment_recovers_a_permutation_exactly(mt: str) -> None:
    model = prepare_model(tiny_model(mt, seed=1))
    layer = moe_layers(model)[0]
    runner = ExpertRunner(layer)
    axes = layer.family.neuron_axes()
    n = runner.n
    q = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    original = {k: v.detach().clone() for k, v in expert_tensors(layer, 0).items()}
    with torch.no_grad():
        for name, t in expert_tensors(layer, 1).items():
            t.copy_(permute_neurons(original[name], axes[name], q) if name in axes else original[name])
    x = torch.randn(64, model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model,
                    generator=torch.Generator().manual_seed(1))
    # the family table's layout is right: a permuted expert computes the same function
    torch.testing.assert_close(runner.output(1, x), runner.output(0, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runner.hidden(1, x), runner.hidden(0, x)[:, q], rtol=1e-5, atol=1e-6)
    # ... and the activations are the down projection's input: output = down(hidden) + output-side biases
    down_name = layer.family.expert_down
    down = original[down_name].float()
    rebuilt = runner.hidden(0, x).float() @ (down if axes[down_name].axis == 0 else down.T)
    rebuilt = rebuilt + sum((t for k, t in original.items() if k not in axes), torch.zeros(()))
    torch.testing.assert_close(rebuilt, runner.output(0, x).float(), rtol=1e-4, atol=1e-5)
    w0, w1 = weight_features(layer, 0), weight_features(layer, 1)
    inverse = torch.argsort(q)
    perm = align(ream_cost(runner.hidden(0, x), runner.hidden(1, x), w0, w1))
    assert torch.equal(perm, inverse)
    assert torch.equal(align(weight_matching_cost(w0, w1)), inverse)
    perms = torch.arange(n).repeat(layer.num_experts, 1)
    perms[1] = perm
    groups = [[0, 1]] + [[e] for e in range(2, layer.num_experts)]
    merge_layer(layer, groups, [[0.3, 0.7]] + [[1.0]] * (len(groups) - 1), perms)
    for name, t in expert_tensors(layer, 0).items():
        torch.testing.assert_close(t, original[name], rtol=1e-6, atol=1e-7)


# -- every family -----------------------------------------------------------------------------------


def _st_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors") if p.name != "merge_permutations.safetensors")


@pytest.mark.parametrize("mt", [*TINY_FAMILIES, "deepseek_v4", "longcat_flash"])  # hash tables; zero experts
def test_merged_checkpoint_reloads_generates_and_is_smaller(mt: str, tmp_path: Path) -> None:
    base, stats = _family_setup(mt)
    tok = tiny_tokenizer()
    model = copy.deepcopy(base)
    model.save_pretrained(tmp_path / "orig")
    plan = merge_model(model, stats, "ream", 0.5, group_size=4)
    ids = _ids()
    expected = forward_logits(model, ids)
    save_checkpoint(model, tok, tmp_path / "out", card="# merged", plan=plan)
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    reloaded = prepare_model(auto.from_pretrained(tmp_path / "out").eval())
    fam = family_of(reloaded)
    assert fam.num_experts(reloaded.config) == 4
    assert all(l.num_experts == 4 for l in moe_layers(reloaded))
    torch.testing.assert_close(forward_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    gen = reloaded.generate(input_ids=ids[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > (1 if model.config.is_encoder_decoder else 5)
    assert _st_bytes(tmp_path / "out") < 0.9 * _st_bytes(tmp_path / "orig")
    saved = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert saved["kind"] == "merge" and all(len(l["groups"]) == 4 for l in saved["layers"])
    # the plan and its permutations replay the merge on the original model, without statistics
    replay = apply_merge_plan(copy.deepcopy(base), MergePlan.load(tmp_path / "out" / "plan.json"))
    torch.testing.assert_close(forward_logits(replay, ids), expected, rtol=1e-6, atol=1e-6)


def test_group_limited_router_merges_within_groups() -> None:
    model, stats = _family_setup("deepseek_v2")
    for method in ("hc-smoe", "m-smoe"):
        plan = merge_model(copy.deepcopy(model), stats, method, 0.5)
        for lp in plan.layers:
            assert all(len({e // 4 for e in g}) == 1 for g in lp.groups), lp.groups
            assert [e // 4 for e in lp.keep] == [0, 0, 1, 1]
    with pytest.raises(MoeSlimError, match="multiple of 2"):
        merge_model(copy.deepcopy(model), stats, "ream", 0.375)


def test_sequential_merging_recomputes_inputs_through_merged_layers() -> None:
    model = prepare_model(tiny_model("qwen3_moe", seed=1))
    tok = tiny_tokenizer()
    layers = moe_layers(model)
    batches = {"general": make_batches(tok, TEXTS["general"], seq_len=48, batch_size=2, max_tokens=None, pack=True)}
    before = [_gather_layer(model, l, batches, 500).get("general", l.index, "x") for l in layers]
    merged = copy.deepcopy(model)
    plan = merge_model(merged, None, "ream", 0.5, sequential=True, calibration=TEXTS, tokenizer=tok, seq_len=48,
                       group_size=4)
    assert plan.info["sequential"] and all(len(l.groups) == 4 for l in plan.layers)
    assert all(l.num_experts == 4 for l in moe_layers(merged))
    merge_layer(layers[0], plan.layers[0].groups, plan.layers[0].weights, plan.permutations.get(0))
    after = [_gather_layer(model, l, batches, 500).get("general", l.index, "x") for l in layers]
    assert torch.equal(after[0], before[0])  # nothing before layer 0 changed
    assert not torch.allclose(after[1], before[1])  # layer 1 now sees the merged layer 0


# -- bad input ----------------------------------------------------------------------------------------


def test_bad_requests_are_one_line_errors() -> None:
    model, stats = _family_setup("qwen3_moe")
    m = copy.deepcopy(model)
    with pytest.raises(MoeSlimError, match="fewer than top-k=2"):
        merge_model(m, stats, "ream", 0.9)
    with pytest.raises(MoeSlimError, match="unknown merge method 'bogus'"):
        merge_model(m, stats, "bogus", 0.5)
    with pytest.raises(MoeSlimError, match="strictly between 0 and 1"):
        merge_model(m, stats, "ream", 1.0)
    no_samples = RouterStats(stats.domains, dict(stats.meta))
    with pytest.raises(MoeSlimError, match=r"moe-slim observe .* --samples 32k"):
        merge_model(m, no_samples, "hc-smoe", 0.5)
    with pytest.raises(MoeSlimError, match="group-size"):
        merge_model(m, stats, "ream", 0.5, group_size=1)
    with pytest.raises(MoeSlimError, match="sequential merging"):
        merge_model(m, stats, "ream", 0.5, sequential=True)
    assert all(l.num_experts == 8 for l in moe_layers(m)), "nothing may change on error"


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("merge_cli")
    save_tiny("gpt_oss", d / "model", seed=5)
    for dom, texts in TEXTS.items():
        (d / f"{dom}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    calib = f"general={d / 'general.jsonl'},code={d / 'code.jsonl'}"
    assert main(["observe", str(d / "model"), "--calib", calib, "--out", str(d / "plain"), "--seq-len", "32",
                 "--quiet"]) == 0
    assert main(["observe", str(d / "model"), "--calib", calib, "--out", str(d / "stats"), "--seq-len", "32",
                 "--samples", "64", "--quiet"]) == 0
    return d


def test_cli_merge_replay_and_apply(cli_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(cli_dir / "model"), "--method", "m-smoe", "--ratio", "0.5", "--stats",
                 str(cli_dir / "stats"), "--mix", "code=1", "--out", str(out), "--quiet"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4
    card = (out / "README.md").read_text()
    assert "m-smoe" in card and "code" in card and (out / "merge_permutations.safetensors").exists()
    replay = tmp_path / "replay"
    assert main(["merge", str(cli_dir / "model"), "--plan", str(out / "plan.json"), "--out", str(replay),
                 "--quiet"]) == 0
    a, b = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(replay)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # `moe-slim apply` replays merge plans too (the permutations file beside the plan)
    applied = tmp_path / "applied"
    assert main(["apply", str(cli_dir / "model"), "--plan", str(out / "plan.json"), "--out", str(applied)]) == 0
    c = AutoModelForCausalLM.from_pretrained(applied)
    assert all(torch.equal(p1, p2) for p1, p2 in zip(a.state_dict().values(), c.state_dict().values()))
    (out / "merge_permutations.safetensors").unlink()
    capsys.readouterr()
    code = main(["apply", str(cli_dir / "model"), "--plan", str(out / "plan.json"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "merge_permutations.safetensors is not beside it" in err and not (tmp_path / "x").exists()


def test_cli_merge_from_calibration_text_sequentially(cli_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seq"
    calib = f"general={cli_dir / 'general.jsonl'},code={cli_dir / 'code.jsonl'}"
    assert main(["merge", str(cli_dir / "model"), "--method", "ream", "--ratio", "0.25", "--calib", calib,
                 "--sequential", "--group-size", "4", "--seq-len", "32", "--out", str(out), "--quiet"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["info"]["sequential"] and [len(l["groups"]) for l in plan["layers"]] == [6, 6]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 6
    out = tmp_path / "hc"  # observed here, with samples, then merged
    assert main(["merge", str(cli_dir / "model"), "--method", "hc-smoe", "--ratio", "0.5", "--calib", calib,
                 "--samples", "100", "--seq-len", "32", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "plan.json").read_text())["info"]["sample_tokens_per_layer"][0] <= 200


@pytest.mark.parametrize("extra, match", [
    (["--method", "bogus", "--ratio", "0.5"], "unknown merge method"),
    (["--ratio", "0.9"], "fewer than top-k"),
    (["--ratio", "0.5", "--stats", "PLAIN"], "--samples 32k"),
    (["--ratio", "0.5", "--sequential"], "give --calib"),
])
def test_cli_merge_bad_input(cli_dir: Path, tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    out = tmp_path / "out"
    extra = [str(cli_dir / "plain") if e == "PLAIN" else e for e in extra]
    if "--stats" not in extra:
        extra += ["--stats", str(cli_dir / "stats")]
    code = main(["merge", str(cli_dir / "model"), "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("moe-slim: ") and match in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_gemma4_members_merge_with_their_per_expert_scale() -> None:
    """Gemma-4 weighs expert e by ``p * s_e``: a member merges as ``s_e f_e`` (the scale folded into its down
    projection) and the merged expert's scale is 1, so two copies with different scales average their scales."""
    model = tiny_model("gemma4", seed=1)
    duplicate_experts(model, [[0, 1]])  # expert 1 is a copy of expert 0, with its own scale
    layer = moe_layers(model)[0]
    s = layer.expert_scale.detach().clone()
    assert abs(float(s[0] - s[1])) > 0.05
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = [layer.expert_output(layer.one_expert(e), x) for e in (0, 2)]
    merge_layer(layer, [[0, 1]] + [[e] for e in range(2, 8)], [[0.5, 0.5]] + [[1.0]] * 6)
    assert layer.num_experts == 7 and torch.equal(layer.expert_scale.detach(), torch.ones(7))
    merged, alone = (layer.expert_output(layer.one_expert(e), x) for e in (0, 1))
    torch.testing.assert_close(merged, before[0] * (s[0] + s[1]) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, before[1] * s[2], rtol=1e-5, atol=1e-6)  # a group of one: s f, unchanged
