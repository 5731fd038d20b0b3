"""Statistics are sums: they add across runs, mix linearly, ignore padding, and round-trip to disk."""

from __future__ import annotations

import pytest
import torch

from moe_slim.errors import MoeSlimError
from moe_slim.experts.criteria import ALL_CRITERIA, score
from moe_slim.experts.observe import observe
from moe_slim.experts.stats import ALL_FIELDS, MAX_FIELDS, RouterStats
from moe_slim.modeling.loading import load_model
from moe_slim.modeling.tiny import save_tiny, tiny_model, tiny_tokenizer

TEXTS_A = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs", "hello world"]
TEXTS_B = ["def f(x):\n    return x * 2", "for i in range(10): print(i)", "import os, sys"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen3_moe", seed=2)
    return model, tiny_tokenizer()


def _obs(model, tok, calib, **kw):
    kw.setdefault("pack", False)
    kw.setdefault("batch_size", 1)
    return observe(model, tok, calib, seq_len=64, **kw)


def test_two_runs_add_up_to_one_run_on_the_union(setup) -> None:
    model, tok = setup
    a = _obs(model, tok, {"general": TEXTS_A})
    b = _obs(model, tok, {"general": TEXTS_B})
    ab = _obs(model, tok, {"general": TEXTS_A + TEXTS_B})
    s = a + b
    for f in ALL_FIELDS:
        torch.testing.assert_close(s.domains["general"][f], ab.domains["general"][f], rtol=1e-12, atol=1e-12)
    # counts are exact integers
    assert torch.equal(s.domains["general"]["count"], ab.domains["general"]["count"])
    assert s.domains["general"]["tokens"][0] == sum(len(tok(t)["input_ids"]) for t in TEXTS_A + TEXTS_B)


def test_mix_is_the_weighted_sum_of_domains(setup) -> None:
    model, tok = setup
    st = _obs(model, tok, {"general": TEXTS_A, "code": TEXTS_B})
    t_g, t_c = st.tokens("general"), st.tokens("code")
    mixed = st.mix({"general": 3, "code": 1})
    t_mix = t_g + t_c
    c_g, c_c = 0.75 * t_mix / t_g, 0.25 * t_mix / t_c
    for f in ("count", "weight_sum", "soft_sum", "norm_sum", "wnorm_sum", "rwnorm_sum"):
        expected = c_g.view(-1, 1) * st.domains["general"][f] + c_c.view(-1, 1) * st.domains["code"][f]
        torch.testing.assert_close(mixed.tensors[f], expected, rtol=1e-12, atol=1e-12)
    for f in MAX_FIELDS:
        assert torch.equal(mixed.tensors[f], torch.maximum(st.domains["general"][f], st.domains["code"][f]))
    # weights proportional to the observed tokens give the plain sum
    plain = st.mix(None)
    prop = st.mix({"general": float(t_g[0]), "code": float(t_c[0])})
    torch.testing.assert_close(prop.tensors["count"], plain.tensors["count"], rtol=1e-12, atol=1e-9)
    # a mix of one domain scores like that domain alone
    only = st.mix({"code": 1})
    torch.testing.assert_close(only.tensors["count"], st.domains["code"]["count"])


def test_padding_never_counts(setup) -> None:
    model, tok = setup
    single = _obs(model, tok, {"g": TEXTS_A}, batch_size=1)
    padded = _obs(model, tok, {"g": TEXTS_A}, batch_size=3)  # rows of different length: padding inside
    assert torch.equal(single.domains["g"]["count"], padded.domains["g"]["count"])
    assert torch.equal(single.domains["g"]["tokens"], padded.domains["g"]["tokens"])
    torch.testing.assert_close(single.domains["g"]["wnorm_sum"], padded.domains["g"]["wnorm_sum"], rtol=1e-4, atol=1e-6)


def test_observed_counts_match_the_router(setup) -> None:
    """Every non-pad token selects exactly top-k experts, and coselection's diagonal is the count."""
    model, tok = setup
    st = _obs(model, tok, {"g": TEXTS_A})
    d = st.domains["g"]
    k = model.config.num_experts_per_tok
    assert torch.equal(d["count"].sum(1), d["tokens"] * k)
    assert torch.equal(torch.diagonal(d["coselect"], dim1=1, dim2=2), d["count"])
    torch.testing.assert_close(d["soft_sum"].sum(1), d["tokens"], rtol=1e-6, atol=1e-6)


def test_save_load_round_trip_and_errors(setup, tmp_path) -> None:
    model, tok = setup
    st = _obs(model, tok, {"general": TEXTS_A, "code": TEXTS_B})
    st.save(tmp_path / "s")
    back = RouterStats.load(tmp_path / "s")
    for d in st.domains:
        for f in ALL_FIELDS:
            assert torch.equal(back.domains[d][f], st.domains[d][f])
    assert back.meta["model_fingerprint"] == st.meta["model_fingerprint"]
    back.check_model(model)
    with pytest.raises(MoeSlimError, match="already exists"):
        st.save(tmp_path / "s")
    (tmp_path / "s" / "stats.safetensors").write_bytes(b"garbage")
    with pytest.raises(MoeSlimError, match="corrupt"):
        RouterStats.load(tmp_path / "s")
    with pytest.raises(MoeSlimError, match="not a stats directory"):
        RouterStats.load(tmp_path / "missing")
    other = tiny_model("qwen3_moe", seed=2, num_experts=16)
    with pytest.raises(MoeSlimError, match="8 experts per layer; this model has 16"):
        st.check_model(other)
    other = tiny_model("qwen3_moe", seed=2, moe_intermediate_size=24)
    with pytest.raises(MoeSlimError, match="another model"):
        st.check_model(other)


def test_every_criterion_is_computable_from_saved_stats(setup, tmp_path) -> None:
    model, tok = setup
    _obs(model, tok, {"general": TEXTS_A, "code": TEXTS_B}).save(tmp_path / "s")
    st = RouterStats.load(tmp_path / "s")
    for c in ALL_CRITERIA:
        s = score(st, c, mix={"code": 1.0})
        assert s.shape == (2, 8) and torch.isfinite(s).all(), c
    freq = score(st, "frequency", mix={"code": 1})
    torch.testing.assert_close(freq.sum(1), torch.full((2,), 2.0, dtype=torch.float64))
    reap = score(st, "reap", mix={"code": 1})
    d = st.domains["code"]
    torch.testing.assert_close(reap, d["rwnorm_sum"] / d["count"].clamp_min(1))
    # this router renormalises its top-k weights, so the model-weight form is the same
    torch.testing.assert_close(score(st, "reap_weights", mix={"code": 1}), reap)
    assert torch.equal(score(st, "random", seed=5), score(st, "random", seed=5))


def test_observation_through_accelerate_offload_matches(tmp_path) -> None:
    """A device_map with CPU and disk offload records the same statistics."""
    save_tiny("qwen3_moe", tmp_path / "m", seed=4)
    tok = tiny_tokenizer()
    plain, _ = load_model(tmp_path / "m")
    ref = _obs(plain, tok, {"g": TEXTS_A})
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    off, _ = load_model(tmp_path / "m", device_map=dmap, offload_folder=str(tmp_path / "off"))
    got = _obs(off, tok, {"g": TEXTS_A})
    assert torch.equal(got.domains["g"]["count"], ref.domains["g"]["count"])
    torch.testing.assert_close(got.domains["g"]["wnorm_sum"], ref.domains["g"]["wnorm_sum"])


def test_task_contrast_warns_when_its_reference_is_its_target(setup, capsys) -> None:
    from moe_slim.experts.criteria import score

    model, tok = setup
    stats = _obs(model, tok, {"general": TEXTS_A, "code": TEXTS_B})
    domains = list(stats.domains)
    score(stats, "task_contrast", mix={d: 1.0 for d in domains})
    assert "task_contrast: the reference" in capsys.readouterr().err
    score(stats, "task_contrast", mix={domains[0]: 1.0})
    assert capsys.readouterr().err == ""
