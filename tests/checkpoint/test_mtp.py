"""MTP (next-n) layers stored in a checkpoint are MoE layers of it: found from transformers' own patterns,
observed with the family's MTP forward, pruned and merged with the rest (streamed and in memory) so
every tensor agrees with the config, or dropped only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from core_helpers import experts_masked
from mtp_helpers import (
    assert_agrees_with_config,
    save_tiny_deepseek_mtp,
    save_tiny_layer_mtp,
    router_keys,
    save_tiny_qwen3_next_mtp,
    transformers_mtp,
)
from safetensors.torch import load_file

from moe_slim.api import apply_checkpoint, merge_checkpoint, prune_checkpoint
from moe_slim.cli import main
from moe_slim.experts.observe import observe, observe_layerwise
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.families import moe_layers
from moe_slim.modeling.loading import load_model
from moe_slim.modeling.mtp import count_key, mtp_of, mtp_patterns
from moe_slim.modeling.mtp_forward import mtp_step, shifted
from moe_slim.modeling.shards import ShardedCheckpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = {"general": ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen jugs"],
         "code": ["def f(x):\n    return x * 2\n" * 3]}
IDS = torch.tensor([[5, 17, 40, 3, 22, 9, 61, 30, 12, 44], [8, 8, 19, 70, 2, 33, 51, 6, 27, 90]])


def _layer_layout(model_type: str) -> dict:
    p = "model.layers.3"
    return dict(build=lambda path: save_tiny_layer_mtp(model_type, path), prefix=p, root=f"{p}.",
                roles={"enorm": f"{p}.enorm", "hnorm": f"{p}.hnorm", "eh_proj": f"{p}.eh_proj",
                       "post_norm": f"{p}.shared_head.norm"})


def _declared_mtp() -> dict[str, list]:
    """model type -> its MTP patterns, for every MoE family moe_slim supports and tests, from the patterns its
    transformers causal-LM class lists in ``_keys_to_ignore_on_load_unexpected``."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moe_slim.families import REFUSED
    from moe_slim.families.catalog import moe_model_types, text_model_type
    from moe_slim.families.table import UNTESTED
    from moe_slim.modeling.mtp import mtp_regexes
    from moe_slim.modeling.tiny import tiny_model

    out = {}
    for mt in moe_model_types():
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_model_type(mt) or "")
        cls = getattr(transformers, name, None) if name and mt not in REFUSED and mt not in UNTESTED else None
        pats = mtp_regexes(list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []), 0)
        if cls is not None and not pats and getattr(AutoConfig.for_model(text_model_type(mt)), "num_mtp_layers", None):
            pats = mtp_patterns(tiny_model(mt))  # the model sets its patterns per instance (Bailing-hybrid)
        if pats:
            out[mt] = pats
    return out


DECLARED = _declared_mtp()
#: ``mtp.*`` families whose MTP layer is stored as Qwen3-Next stores it (mtp.layers.N, mtp.fc, mtp.pre_fc_norm_*)
QWEN_STYLE = ("qwen3_next", "qwen3_5_moe")
#: ``mtp.*`` families no tiny checkpoint is built for here: their MTP tensors' inner layout is not known to
#: these tests (moe_slim grafts them when it can place them and refuses to write them otherwise)
MTP_LAYOUT_UNTESTED = ("ernie4_5_moe", "exaone_moe", "mimo_v2_flash", "minimax_m3_vl", "nemotron_h",
                       "hy_v4",  # its MTP layout (indexed attention, hash-routed layers) is not known to us yet
                       # mtp.* (DeepSeek-V4: hyper-connections and hash routing around it) and model.mtp.* (LongCat):
                       # their inner layouts are not known to us yet
                       "deepseek_v4", "longcat_flash",
                       # indexed (DSA) attention: transformers 5.24's own MtpModel.forward_layer hands the indexer no
                       # mask (TypeError), so there is no reference forward to test against (moe_slim's step
                       # materialises the mask, as the model's forward does)
                       "deepseek_v32", "glm_moe_dsa",
                       # Qwen4-Exp: its layers run on hc_count hyper-connection streams; transformers 5.24 has no
                       # Qwen4-Exp MTP forward, so how its mtp.* layer is fed (one stream of H) is not known to us
                       "qwen4_exp",
                       # dots3: its config has no MTP fields, so transformers' defaults give the MTP layer full
                       # attention, for which its config has no rope parameters (its layers are indexed or sliding)
                       "dots3_note",
                       # Bailing-hybrid: MTP layers model.layers.N after the last, stored in Bailing's own names
                       # (word_embeddings, attention.dense, per-expert modules); transformers 5.24 converts the main
                       # layers but names no MTP part (enorm, hnorm, eh_proj), so their inner layout is not known
                       "bailing_hybrid",
                       "mellum")  # Mellum: stored as Qwen3-Next's, but its MTP layer's sliding attention needs rope
                                  # parameters for that layer type, which a shrunk config has not
#: every supported family whose transformers class names numbered MTP layers (DeepSeek-V3 ``model.layers.61``,
#: GLM-4.5 ``model.layers.92``, HY-V3 ``model.layers.80``), and the Qwen3-Next layout
LAYOUTS = {
    **{mt: _layer_layout(mt) for mt, pats in DECLARED.items()
       if any("mtp_index" in p.groupindex for p in pats) and mt not in MTP_LAYOUT_UNTESTED},
    **{mt: dict(build=lambda path, mt=mt: save_tiny_qwen3_next_mtp(path, model_type=mt), prefix="mtp.layers.0",
                root="mtp.", roles={"enorm": "mtp.pre_fc_norm_embedding", "hnorm": "mtp.pre_fc_norm_hidden",
                                    "eh_proj": "mtp.fc", "post_norm": "mtp.norm"})
       for mt in QWEN_STYLE},
}


def test_every_supported_family_that_stores_mtp_layers_is_tested_or_named() -> None:
    assert {"deepseek_v3", "glm4_moe", "qwen3_next"} <= set(LAYOUTS)
    assert set(DECLARED) == set(LAYOUTS) | set(MTP_LAYOUT_UNTESTED)


def _build(model_type: str, d: Path) -> dict:
    src = LAYOUTS[model_type]["build"](d / "src")
    torch.set_num_threads(1)
    model, tok = load_model(src)
    observe(model, tok, TEXTS, seq_len=16, batch_size=2, pack=False, samples=64).save(d / "stats")
    return {**LAYOUTS[model_type], "type": model_type, "src": src, "stats": d / "stats", "dir": d}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def fam(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint of each MTP layout, with its statistics."""
    return _build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The DeepSeek-V3-shaped one (``model.layers.3`` after 3 layers), for the checks made once."""
    return _build("deepseek_v3", tmp_path_factory.mktemp("ds"))


def mtp_logits(path: Path, plan: ExpertPlan | None = None) -> torch.Tensor:
    """Logits of the MTP layer under transformers' own ``MtpModel`` (with ``plan``'s removed experts masked)."""
    model, _ = load_model(path)
    ref = transformers_mtp(model, path)
    nxt, _ = shifted(IDS, torch.ones_like(IDS), 1)
    pos = (torch.arange(IDS.shape[1]) + 1).expand(IDS.shape[0], -1)
    with torch.no_grad():
        if plan is None:
            h = model.model(input_ids=IDS, use_cache=False).last_hidden_state
            return ref.shared_head(ref.forward_layer(0, h, pos, None, input_ids=nxt))
        with experts_masked(model, plan):  # the main layers' removed experts too: they shape h_t
            h = model.model(input_ids=IDS, use_cache=False).last_hidden_state
        with experts_masked(ref, ExpertPlan(plan.family, plan.num_experts, plan.top_k, plan.layers[-1:])):
            return ref.shared_head(ref.forward_layer(0, h, pos, None, input_ids=nxt))


def test_mtp_layers_are_found_from_transformers_and_run_as_transformers_runs_them(fam: dict) -> None:
    model, _ = load_model(fam["src"])
    info = mtp_of(model)
    on_disk = ShardedCheckpoint(fam["src"]).keys
    assert sorted(info.keys) == sorted(k for k in on_disk if k.startswith(fam["root"]))
    assert info.layer_names() == [fam["prefix"]] and getattr(model.config, count_key(model.config)) == 1
    assert info.depths[0].roles == fam["roles"]
    names = [l.name for l in moe_layers(model)]
    assert names[-1] == f"{fam['prefix']}.mlp" and len(names) >= 3
    # the grafted layer holds the checkpoint's values, and the main forward never runs it
    disk = load_file(str(fam["src"] / "model.safetensors"))
    eh_proj = fam["roles"]["eh_proj"]
    assert torch.equal(model.get_submodule(eh_proj).weight, disk[f"{eh_proj}.weight"])
    router = router_keys(fam["src"])
    assert router and all(k.startswith(f"{fam['prefix']}.mlp.") for k in router)
    # moe_slim's MTP step is transformers' MtpModel.forward_layer, exactly
    ref = transformers_mtp(model, fam["src"])
    with torch.no_grad():
        h = model.model(input_ids=IDS, use_cache=False).last_hidden_state
        nxt, _ = shifted(IDS, torch.ones_like(IDS), 1)
        pos = (torch.arange(IDS.shape[1]) + 1).expand(IDS.shape[0], -1)
        assert torch.equal(mtp_step(model, 0, h, nxt, None, pos), ref.forward_layer(0, h, pos, None, input_ids=nxt))


def test_deepseek_v3s_own_pattern_is_read_as_the_layers_after_the_model(ds: dict) -> None:
    model, _ = load_model(ds["src"])
    # DeepSeek-V3 lists `model\.layers\.61.*` (the published model has 61 layers): any layer from num_hidden_layers
    assert [p.pattern for p in mtp_patterns(model)] == [r"model\.layers\.(?P<mtp_index>\d+).*"]
    assert count_key(model.config) == "num_nextn_predict_layers"  # transformers' num_mtp_layers alias
    assert torch.equal(model.model.layers[3].mlp.gate.e_score_correction_bias,
                       load_file(str(ds["src"] / "model.safetensors"))["model.layers.3.mlp.gate.e_score_correction_bias"])


def test_the_mtp_layer_has_statistics_of_its_own_on_both_observation_paths(fam: dict) -> None:
    model, tok = load_model(fam["src"])
    whole = observe(model, tok, TEXTS, seq_len=16, batch_size=2, pack=False)
    layerwise = observe_layerwise(fam["src"], tok, TEXTS, seq_len=16, batch_size=2, pack=False)
    assert whole.meta["layers"][-1] == f"{fam['prefix']}.mlp"
    for d in TEXTS:
        a, b = whole.domains[d], layerwise.domains[d]
        rows = len(TEXTS[d])  # one text per row (no packing): each row's last token has no next token
        assert a["tokens"][-1] == a["tokens"][-2] - rows > 0
        assert a["count"][-1].sum() == a["tokens"][-1] * 2  # top-2 of the MTP layer's own routing
        assert not torch.equal(a["count"][-1], a["count"][-2])
        for f in ("tokens", "count", "soft_sum", "weight_sum", "norm_sum"):
            torch.testing.assert_close(a[f], b[f], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_pruning_cuts_the_mtp_layer_with_the_model(fam: dict, in_memory: bool, tmp_path: Path) -> None:
    out, p = tmp_path / "out", fam["prefix"]
    plan = prune_checkpoint(fam["src"], fam["stats"], out, ratio=0.5, in_memory=in_memory, progress=False)
    assert [l.name for l in plan.layers][-1] == f"{p}.mlp"
    assert_agrees_with_config(out, mtp_layers=1)
    disk = load_file(str(out / "model.safetensors"))
    src = load_file(str(fam["src"] / "model.safetensors"))
    keep = plan.layers[-1].keep
    routers = router_keys(fam["src"])  # weight (and a correction bias)
    assert routers and all(torch.equal(disk[k], src[k][keep]) for k in routers)
    for j, e in enumerate(keep):
        assert torch.equal(disk[f"{p}.mlp.experts.{j}.down_proj.weight"], src[f"{p}.mlp.experts.{e}.down_proj.weight"])
    rest = [k for k in src if k.startswith(fam["root"]) and ".mlp.experts." not in k and k not in routers]
    assert len(rest) > 6 and all(torch.equal(disk[k], src[k]) for k in rest)  # attention, norms, projection, copies
    # the pruned MTP layer predicts as the original does with the removed experts masked out of its routing
    torch.testing.assert_close(mtp_logits(out), mtp_logits(fam["src"], plan), rtol=1e-5, atol=1e-5)


def _merge_alike(c: dict, tmp_path: Path, how: dict) -> None:
    size = merge_checkpoint(c["src"], tmp_path / "size", ratio=0.5, device="cpu", **how)
    mem = merge_checkpoint(c["src"], tmp_path / "mem", ratio=0.5, device="cpu", in_memory=True, **how)
    assert [l.groups for l in size.layers] == [l.groups for l in mem.layers]
    assert size.layers[-1].name == f"{c['prefix']}.mlp"
    for out in ("size", "mem"):
        assert_agrees_with_config(tmp_path / out, mtp_layers=1)
    a, b = load_file(str(tmp_path / "size" / "model.safetensors")), load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith(f"{c['prefix']}.mlp.experts.3.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_merging_at_size_and_in_memory_merge_the_mtp_layer_alike(fam: dict, tmp_path: Path) -> None:
    """From observed samples: the same plan and tensors at size as in memory, MTP layer included."""
    _merge_alike(fam, tmp_path, dict(method="average", stats_path=fam["stats"]))


def test_sequential_merging_reaches_the_mtp_layer_through_its_forward(ds: dict, tmp_path: Path) -> None:
    """REAM's sequential merge: the MTP layer's sample is re-gathered through the merged layers before it
    by the MTP forward, at size (layer by layer from the shards) as in memory."""
    _merge_alike(ds, tmp_path, dict(method="ream", calib=TEXTS, sequential=True, seq_len=16, batch_size=2,
                                    max_tokens=64))


@pytest.mark.parametrize("how", ["streamed", "in-memory", "merged"])
def test_drop_mtp_removes_the_layer_and_zeroes_the_count(ds: dict[str, Path], how: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if how == "merged":
        assert main(["merge", str(ds["src"]), "--method", "average", "--ratio", "0.5", "--stats", str(ds["stats"]),
                     "--device", "cpu", "--drop-mtp", "--out", str(out), "--quiet"]) == 0
    else:
        assert main(["prune", str(ds["src"]), "--stats", str(ds["stats"]), "--ratio", "0.5", "--drop-mtp", "--out",
                     str(out), "--quiet", *(["--in-memory"] if how == "in-memory" else [])]) == 0
    assert_agrees_with_config(out, mtp_layers=0)
    assert not [k for k in ShardedCheckpoint(out).keys if k.startswith("model.layers.3.")]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0 and cfg["moe_slim"]["dropped_mtp"] == ["model.layers.3"]


def test_a_plan_without_the_mtp_layer_gives_it_the_last_layers_experts(ds: dict[str, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    plan = prune_checkpoint(ds["src"], ds["stats"], tmp_path / "p", ratio=0.5, plan_only=True)
    plan.layers = plan.layers[:-1]  # as a plan made before moe_slim knew the MTP layer
    plan.save(tmp_path / "old.json")
    applied = apply_checkpoint(ds["src"], tmp_path / "old.json", tmp_path / "out", progress=False)
    assert "MTP layer model.layers.3.mlp keeps the experts model.layers.2.mlp keeps" in capsys.readouterr().err
    assert applied.layers[-1].keep == applied.layers[-2].keep
    assert_agrees_with_config(tmp_path / "out", mtp_layers=1)


def test_mone_gives_the_mtp_layer_novices_of_its_own(ds: dict[str, Path], tmp_path: Path) -> None:
    from moe_slim.api.mone import mone_checkpoint

    nplan = mone_checkpoint(ds["src"], ds["stats"], tmp_path / "std", ratio=0.5, standard=True)
    assert nplan.plan.layers[-1].name == "model.layers.3.mlp"
    assert_agrees_with_config(tmp_path / "std", mtp_layers=1)
    mone_checkpoint(ds["src"], ds["stats"], tmp_path / "sub", ratio=0.5)
    cfg = json.loads((tmp_path / "sub" / "config.json").read_text())
    target = cfg["compression_config"]["transform_config"]["expert_substitution"]["targets"]["model.layers.3.mlp.experts"]
    novices = sorted(int(e) for e in target["replacements"])
    kept = nplan.plan.layers[-1].keep
    assert novices == sorted(set(range(8)) - set(kept))
    stored = {int(k.split(".")[5]) for k in ShardedCheckpoint(tmp_path / "sub").keys
              if k.startswith("model.layers.3.mlp.experts.")}
    assert stored == set(kept)  # the kept experts under their logical ids
    values = load_file(str(tmp_path / "sub" / "novices.safetensors"))
    assert {f"model.layers.3.mlp.experts.novice_values.{e}" for e in novices} <= values.keys()
    for standard in (False, True):  # --drop-mtp: neither the layer nor its novices
        out = tmp_path / f"drop{standard}"
        mone_checkpoint(ds["src"], ds["stats"], out, ratio=0.5, standard=standard, drop_mtp=True)
        assert not [k for k in ShardedCheckpoint(out).keys if k.startswith("model.layers.3.")]
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["num_nextn_predict_layers"] == 0
        if not standard:
            assert list(cfg["compression_config"]["transform_config"]["expert_substitution"]["targets"]) == [
                "model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
            assert not [k for k in load_file(str(out / "novices.safetensors")) if k.startswith("model.layers.3.")]


def test_an_mtp_layer_moe_slim_cannot_run_keeps_the_last_layers_experts(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    src = save_tiny_deepseek_mtp(tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.layers.3.eh_proj.weight"]  # an MTP layout without the projection moe_slim runs
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, tok = load_model(src)
    stats = observe(model, tok, TEXTS, seq_len=16, batch_size=2, pack=False)
    assert "MTP layer model.layers.3 has no eh_proj" in capsys.readouterr().err
    assert float(stats.domains["general"]["tokens"][2]) == 0 < float(stats.domains["general"]["tokens"][1])
    stats.save(tmp_path / "stats")
    plan = prune_checkpoint(src, tmp_path / "stats", tmp_path / "out", ratio=0.5, progress=False)
    assert "no statistics of the MTP layers: MTP layer model.layers.3.mlp keeps" in capsys.readouterr().err
    assert plan.layers[2].keep == plan.layers[1].keep
    assert_agrees_with_config(tmp_path / "out", mtp_layers=1)


def test_layerwise_observation_resumes_before_the_mtp_layer(ds: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_slim.modeling.materialize import WeightSource

    _, tok = load_model(ds["src"])
    settings = dict(seq_len=16, batch_size=2, pack=False)
    reference = observe_layerwise(ds["src"], tok, TEXTS, **settings)
    real_load, loads, stop = WeightSource.load, [], [True]

    def load(self, module, *a, **k):
        loads.append(module)
        if module == "model.layers.3" and stop:
            stop.clear()
            raise KeyboardInterrupt  # once: after the main layers finished, before the MTP layer
        return real_load(self, module, *a, **k)

    monkeypatch.setattr(WeightSource, "load", load)
    with pytest.raises(KeyboardInterrupt):
        observe_layerwise(ds["src"], tok, TEXTS, **settings, work_dir=tmp_path / "w", cache_bytes=0)
    loads.clear()
    resumed = observe_layerwise(ds["src"], tok, TEXTS, **settings, work_dir=tmp_path / "w", cache_bytes=0)
    assert loads == ["model.layers.3"], "only the MTP layer runs again"
    for d in TEXTS:
        for f, t in reference.domains[d].items():
            assert torch.equal(t, resumed.domains[d][f]), f


def test_an_fp8_mtp_layer_is_sliced_without_dequantizing(tmp_path: Path) -> None:
    """DeepSeek-V3 as published: FP8 experts with block scales, in the MTP layer too."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = save_tiny_deepseek_mtp(tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    for k in [k for k in sd if ".mlp.experts." in k and k.endswith("_proj.weight")]:
        sd[k[: -len("weight")] + "weight_scale_inv"] = torch.rand(1, 1) + 0.5
        sd[k] = sd[k].to(torch.float8_e4m3fn)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (src / "config.json").write_text(json.dumps(cfg))
    plan = ExpertPlan("deepseek_v3", 8, 2, [LayerPlan(f"model.layers.{i}.mlp", keep) for i, keep in
                                            ((1, [0, 1, 4, 5]), (2, [2, 3, 6, 7]), (3, [0, 2, 5, 7]))])
    plan.save(tmp_path / "plan.json")
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "out", progress=False)
    assert_agrees_with_config(tmp_path / "out", mtp_layers=1)
    with safe_open(str(src / "model.safetensors"), "pt") as fs, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fo:
        for j, e in enumerate([0, 2, 5, 7]):
            for part in ("down_proj.weight", "down_proj.weight_scale_inv"):
                a = fo.get_tensor(f"model.layers.3.mlp.experts.{j}.{part}")
                b = fs.get_tensor(f"model.layers.3.mlp.experts.{e}.{part}")
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert "model.layers.3.mlp.experts.4.down_proj.weight_scale_inv" not in set(fo.keys())


def test_mtp_layers_moe_slim_cannot_place_are_refused_unless_dropped(ds: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from moe_slim.errors import MoeSlimError

    src = tmp_path / "src"
    src.mkdir()
    for f in ds["src"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(src / "model.safetensors"))  # an MTP layer that does not follow the last layer
    sd = {k.replace("model.layers.3.", "model.layers.5.", 1): v for k, v in sd.items()}
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    stats = tmp_path / "stats"
    model, tok = load_model(src)
    assert mtp_of(model).unplaced and [l.name for l in moe_layers(model)][-1] == "model.layers.2.mlp"
    observe(model, tok, TEXTS, seq_len=16, batch_size=2, pack=False).save(stats)
    for in_memory in (False, True):
        with pytest.raises(MoeSlimError, match=r"stores MTP layers \(model\.layers\.5\..*--drop-mtp"):
            prune_checkpoint(src, stats, tmp_path / "out", ratio=0.5, in_memory=in_memory, progress=False)
        assert not (tmp_path / "out").exists()
    prune_checkpoint(src, stats, tmp_path / "out", ratio=0.5, progress=False, drop_mtp=True)
    assert not [k for k in ShardedCheckpoint(tmp_path / "out").keys if k.startswith("model.layers.5.")]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
