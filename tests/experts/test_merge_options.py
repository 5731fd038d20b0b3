"""One options object for merging (issue 31): presets resolve to each reference's defaults, explicit
choices win, bad choices fail in one line, the CLI and the recipe build the same object; REAM's
repository variants compute what its code computes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from moe_slim.errors import MoeSlimError
from moe_slim.experts.merge.config import PRESETS, MergeOptions
from moe_slim.experts.merge.driver import merge_model
from moe_slim.experts.merge.features import layer_features
from moe_slim.experts.merge import options
from moe_slim.experts.merge.options import _pca, pca_layer
from moe_slim.experts.merge.runner import ExpertRunner
from moe_slim.experts.observe import observe
from moe_slim.families import moe_layers
from moe_slim.modeling.dispatch import prepare_model
from moe_slim.modeling.tiny import tiny_model, tiny_tokenizer

TEXTS = {
    "general": ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, they said"],
    "code": ["def f(x):\n    return x * 2", "for i in range(10): print(i)"],
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_presets_resolve_to_the_references_defaults_and_explicit_choices_win() -> None:
    repo = MergeOptions.build("ream-repo").resolved()
    assert (repo.method, repo.preset, repo.weighting, repo.centroids, repo.pca, repo.group_size, repo.sequential) == (
        "ream", "ream-repo", "p2norm-routed", "p2norm-routed", "layer", 16, True)
    assert MergeOptions.build("ream-paper").resolved().model_dump(exclude={"preset"}) == \
        repo.model_dump(exclude={"preset"})  # REAM's README: the defaults are the paper's full REAM
    ours = MergeOptions.build("ream", seed=0).resolved()
    assert (ours.grouping, ours.align, ours.router_row, ours.preset) == ("ream", "ream", "saliency", None)
    mixed = MergeOptions.build("ream-repo", group_size=4, sequential=False).resolved()
    assert (mixed.group_size, mixed.sequential, mixed.weighting) == (4, False, "p2norm-routed")
    hc = MergeOptions.build("hc-smoe-paper").resolved()
    assert (hc.grouping, hc.tied, hc.router_row, hc.align) == ("hc", True, "method", "none")
    ms = MergeOptions.build("m-smoe-paper").resolved()
    assert (ms.grouping, ms.tied, ms.global_dominants, ms.align, ms.weighting) == (
        "msmoe", True, True, "weights", "frequency")
    assert set(PRESETS) == {"ream-repo", "ream-paper", "hc-smoe-paper", "m-smoe-paper"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="ream-rep"), "unknown merge method 'ream-rep'"),
    (dict(method="ream", weighting="ream-repo"), "weighting"),
    (dict(method="ream", group_size=0), "group_size"),
    (dict(method="m-smoe", global_dominants=True), "only a tied M-SMoE"),
])
def test_bad_options_fail_in_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(MoeSlimError, match=match) as info:
        MergeOptions.build(**kwargs).resolved()
    assert "\n" not in str(info.value)


def test_the_cli_and_the_recipe_build_the_same_options(monkeypatch, tmp_path) -> None:
    from moe_slim import api
    from moe_slim.cli import main
    from moe_slim.recipe.spec import MergeStep

    seen: dict = {}

    def fake(model, out, *, method, **kw):
        seen.update(method=method, **kw)
        raise SystemExit(0)

    monkeypatch.setattr(api, "merge_checkpoint", fake)
    with pytest.raises(SystemExit):
        main(["merge", "m", "--method", "ream-repo", "--ratio", "0.5", "--stats", "s", "--group-size", "4",
              "--pca", "pair", "--out", str(tmp_path / "o")])
    choices = {k: v for k, v in seen.items() if k in MergeOptions.model_fields and k != "method"}
    cli = MergeOptions.build(seen["method"], **choices).resolved()
    recipe = MergeStep(method="ream-repo", ratio=0.5, group_size=4, pca="pair")
    assert MergeOptions.build(recipe).resolved() == cli
    assert (cli.group_size, cli.pca, cli.sequential) == (4, "pair", True)


def test_routed_token_p2_norm_is_reams_repository_saliency() -> None:
    model = prepare_model(tiny_model("qwen3_moe", seed=2))
    stats = observe(model, tiny_tokenizer(), TEXTS, seq_len=32, batch_size=2, samples=64)
    layer = moe_layers(model)[0]
    sample = stats.samples.take(0, None, 10_000, 0)
    runner = ExpertRunner(layer)
    feats = layer_features(layer, runner, sample, outputs=True)
    p = sample["logits"].float().softmax(-1)  # REAM: the router's full softmax, gated output p*f, times p again
    routed = sample["route"] > 0
    for e in range(layer.num_experts):
        norm = runner.output(e, sample["x"]).float().norm(dim=-1)
        on = routed[:, e]
        expected = (p[on, e] ** 2 * norm[on]).mean() if on.any() else torch.tensor(0.0)
        torch.testing.assert_close(feats["p2norm-routed"][e].float(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(feats["p2norm-all"][e].float(), (p[:, e] ** 2 * norm).mean(), rtol=1e-5, atol=1e-7)


def test_layer_pca_projects_normalised_rows_onto_v_times_s() -> None:
    g = torch.Generator().manual_seed(0)
    feats = (torch.randn(24, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g,
                                                                                 dtype=torch.float64)).reshape(4, 6, 10)
    got = pca_layer(feats, 4)  # rank <= 4 after centring: the randomised PCA is exact
    rows = torch.nn.functional.normalize(feats.reshape(24, 10), dim=1)
    centred = rows - rows.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    expected = centred @ vh[:4].T * s[:4]
    torch.testing.assert_close(got.reshape(24, 4).double().abs(), expected.abs(), rtol=1e-4, atol=1e-5)


def test_the_ream_repo_preset_merges_sequentially_with_a_progress_bar(capsys) -> None:
    model = prepare_model(tiny_model("qwen3_moe", seed=1))
    plan = merge_model(copy.deepcopy(model), None, "ream-repo", 0.5, group_size=4, calibration=TEXTS,
                       tokenizer=tiny_tokenizer(), seq_len=32, batch_size=2, progress=True)
    i = plan.info
    assert (i["preset"], i["sequential"], i["weighting"], i["centroids"], i["pca"], i["group_size"]) == (
        "ream-repo", True, "p2norm-routed", "p2norm-routed", "layer", 4)
    assert all(len(lp.groups) == 4 for lp in plan.layers)
    err = capsys.readouterr().err
    assert "model.layers.0.mlp" in err and "expert" in err  # tqdm's bar inside each layer


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_pca_in_float64_is_torch_pca_lowrank_and_float32_keeps_it(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # full rank: not exact
    centred = x - x.mean(0, keepdim=True)
    torch.manual_seed(0)
    _, s, v = torch.pca_lowrank(centred, q=6, center=False, niter=4)
    for scale in (False, True):
        expected = centred @ (v * s if scale else v)
        # float64: pca_lowrank's numbers (the wide case projects through the small product: rounding apart)
        torch.testing.assert_close(_pca(x, 6, scale=scale, dtype=torch.float64), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(_pca(x, 6, scale=scale).double(), expected, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("pca", ["pair", "layer"])
def test_float32_pca_gives_the_merge_of_the_float64_pca(pca: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = prepare_model(tiny_model("qwen3_moe", seed=1))
    stats = observe(model, tiny_tokenizer(), TEXTS, seq_len=48, batch_size=2, samples=96)
    got = merge_model(copy.deepcopy(model), stats, "ream", 0.5, pca=pca, pca_dims=3)
    monkeypatch.setattr(options, "_pca", functools.partial(_pca, dtype=torch.float64))
    before = merge_model(copy.deepcopy(model), stats, "ream", 0.5, pca=pca, pca_dims=3)
    assert [lp.groups for lp in got.layers] == [lp.groups for lp in before.layers]
    assert set(got.permutations) == set(before.permutations) and got.permutations
    for li, perm in got.permutations.items():
        assert torch.equal(perm, before.permutations[li])
        assert not torch.equal(perm, torch.arange(perm.shape[1]).repeat(perm.shape[0], 1))  # something aligned
