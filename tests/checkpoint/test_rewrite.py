"""The streaming rewrite: equal to the in-memory path on every family, byte-identical when repeated,
dtype-preserving, slicing MXFP4 and FP8 experts without dequantizing, and refusing bad input."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from core_helpers import keep_pattern
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moe_slim.api import apply_checkpoint
from moe_slim.errors import MoeSlimError
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.experts.prune import apply_plan
from moe_slim.families import auto_class, family_of, moe_layers
from moe_slim.modeling.shards import ShardedCheckpoint
from moe_slim.modeling.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer


def save_sharded(model_type: str, path: Path, dtype: torch.dtype = torch.float32, shard: str = "30KB") -> Path:
    model = tiny_model(model_type).to(dtype)
    model.save_pretrained(str(path), max_shard_size=shard)
    tiny_tokenizer().save_pretrained(str(path))
    return path


def plan_for_model(model: torch.nn.Module) -> ExpertPlan:
    layers = moe_layers(model)
    fam = family_of(model)
    keeps = keep_pattern(len(layers))
    return ExpertPlan(fam.name, layers[0].num_experts, fam.top_k(model.config),
                      [LayerPlan(l.name, k) for l, k in zip(layers, keeps)])


def load(path: Path, **kw) -> torch.nn.Module:
    """A checkpoint loaded through the auto class transformers' mappings give its config."""
    return auto_class(AutoConfig.from_pretrained(str(path))).from_pretrained(str(path), **kw).eval()


def streamed_and_in_memory_agree(src: Path, plan: Path, tmp_path: Path, before: dict[str, str]
                                 ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Apply ``plan`` streamed and in memory: the same tensors and dtypes; the source unchanged.
    Returns the streamed model and its state dict."""
    apply_checkpoint(src, plan, tmp_path / "streamed", max_shard_size="30KB", progress=False)
    apply_checkpoint(src, plan, tmp_path / "memory", in_memory=True)
    assert file_hashes(src) == before, "the source checkpoint must never change"
    streamed, memory = load(tmp_path / "streamed"), load(tmp_path / "memory")
    a, b = streamed.state_dict(), memory.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    return streamed, a


def file_hashes(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_streamed_equals_in_memory_on_every_family(model_type: str, tmp_path: Path) -> None:
    src = save_sharded(model_type, tmp_path / "src")
    assert (src / "model.safetensors.index.json").is_file(), "the source should span several shards"
    plan = plan_for_model(tiny_model(model_type))
    plan.save(tmp_path / "plan.json")
    before = file_hashes(src)
    streamed, a = streamed_and_in_memory_agree(src, tmp_path / "plan.json", tmp_path, before)
    assert all(l.num_experts == 4 for l in moe_layers(streamed))
    # the pruned checkpoint is the source with the removed experts gone: its expert tensors are the kept rows
    ref = tiny_model(model_type)
    apply_plan(ref, plan_for_model(ref))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in a.items())
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "streamed" / "tokenizer.json").is_file() and (tmp_path / "streamed" / "plan.json").is_file()


def test_a_plan_applied_twice_gives_byte_identical_files(tmp_path: Path) -> None:
    src = save_sharded("qwen3_moe", tmp_path / "src")
    plan_for_model(tiny_model("qwen3_moe")).save(tmp_path / "plan.json")
    for name in ("a", "b"):
        apply_checkpoint(src, tmp_path / "plan.json", tmp_path / name, max_shard_size="20KB", progress=False)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert len(list((tmp_path / "a").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_source_dtype_is_kept_on_both_paths(dtype: torch.dtype, tmp_path: Path) -> None:
    src = save_sharded("mixtral", tmp_path / "src", dtype=dtype)
    plan_for_model(tiny_model("mixtral")).save(tmp_path / "plan.json")
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "s", progress=False)
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "m", in_memory=True)
    src_bytes = ShardedCheckpoint(src).total_bytes
    for out in ("s", "m"):
        ck = ShardedCheckpoint(tmp_path / out)
        assert {ck.entry(k).dtype for k in ck.keys} == {"BF16" if dtype == torch.bfloat16 else "F16"}, out
        assert ck.total_bytes < src_bytes
    assert torch.equal(load(tmp_path / "s").lm_head.weight, load(src).lm_head.weight)


def test_dtype_option_converts_floating_weights(tmp_path: Path) -> None:
    src = save_sharded("qwen3_moe", tmp_path / "src")
    plan_for_model(tiny_model("qwen3_moe")).save(tmp_path / "plan.json")
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "out", dtype="bfloat16", progress=False)
    ck = ShardedCheckpoint(tmp_path / "out")
    assert {ck.entry(k).dtype for k in ck.keys} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    source = load(src)
    assert torch.equal(load(tmp_path / "out").model.embed_tokens.weight, source.model.embed_tokens.weight.bfloat16())


# -- quantized experts ---------------------------------------------------------------------------------


def _mxfp4_checkpoint(path: Path) -> Path:
    """A tiny GPT-OSS whose experts are stored as MXFP4 blocks and scales (random, as a quantizer writes them)."""
    save_sharded("gpt_oss", path, shard="1GB")
    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, t in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, n_in, n_out = t.shape  # in memory [E, in, out]; on disk blocks [E, out, in/32, 16]
            out[k + "_blocks"] = torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
            out[k + "_scales"] = torch.randint(118, 130, (E, n_out, n_in // 32), generator=g, dtype=torch.uint8)
        else:
            out[k] = t
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _fp8_checkpoint(path: Path, block: int = 128) -> Path:
    """A tiny DeepSeek-V3 whose routed experts are float8_e4m3fn with block scales (``weight_scale_inv``)."""
    save_sharded("deepseek_v3", path, shard="1GB")
    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, t in sd.items():
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            out[k] = t.to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "weight_scale_inv"] = torch.rand(-(-t.shape[0] // block),
                                                                       -(-t.shape[1] // block), generator=g) + 0.5
        else:
            out[k] = t
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block],
                                  "activation_scheme": "dynamic", "fmt": "e4m3"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("kind", ["mxfp4", "fp8"])
def test_quantized_experts_are_sliced_without_dequantizing(kind: str, tmp_path: Path) -> None:
    from transformers import FineGrainedFP8Config, Mxfp4Config

    model_type = {"mxfp4": "gpt_oss", "fp8": "deepseek_v3"}[kind]
    src = (_mxfp4_checkpoint if kind == "mxfp4" else _fp8_checkpoint)(tmp_path / "src")
    plan = plan_for_model(tiny_model(model_type))
    plan.save(tmp_path / "plan.json")
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "out", progress=False)
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["quantization_config"] == cfg_in["quantization_config"]
    # byte level: every kept expert's stored tensors are copied as they are (uint8 blocks, fp8 weights, scales)
    with safe_open(str(src / "model.safetensors"), "pt") as fs, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fo:
        out_keys = set(fo.keys())
        for lp in plan.layers:
            if kind == "mxfp4":
                for suffix in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_bias"):
                    key = f"{lp.name}.experts.{suffix}"
                    assert torch.equal(fo.get_tensor(key), fs.get_tensor(key)[lp.keep]), key
            else:
                for j, e in enumerate(lp.keep):
                    for part in ("gate_proj.weight", "gate_proj.weight_scale_inv", "down_proj.weight"):
                        a = fo.get_tensor(f"{lp.name}.experts.{j}.{part}")
                        b = fs.get_tensor(f"{lp.name}.experts.{e}.{part}")
                        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                assert f"{lp.name}.experts.4.gate_proj.weight" not in out_keys
    # and transformers reads it: dequantized, the pruned model is the dequantized source with the experts sliced
    q = {"mxfp4": Mxfp4Config(dequantize=True), "fp8": FineGrainedFP8Config(dequantize=True)}[kind]
    pruned = load(tmp_path / "out", quantization_config=q)
    source = load(src, quantization_config=q)
    apply_plan(source, plan)
    a, b = pruned.state_dict(), source.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_shapes_the_block_grid_does_not_divide_fail_in_one_line_naming_the_cause(tmp_path: Path) -> None:
    """transformers reports the cause in a loading report the commands silence, then raises "look at the
    CONVERSION entries of the above report": the one line carries the cause itself."""
    src = _fp8_checkpoint(tmp_path / "src", block=12)  # tiny experts are [16, 32]: a 2 x 3 grid of 12-blocks
    plan_for_model(tiny_model("deepseek_v3")).save(tmp_path / "plan.json")
    with pytest.raises(MoeSlimError) as err:
        apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "out", in_memory=True)
    (line,) = str(err.value).splitlines()
    assert re.search(r"Weight shape \(\d+, \d+\) not divisible by scale grid \(\d, \d\)", line), line
    assert "report" not in line and not (tmp_path / "out").exists()


# -- bad input -----------------------------------------------------------------------------------------


def _expect_refusal(tmp_path: Path, src: Path, plan: Path, match: str) -> None:
    before = file_hashes(src)
    with pytest.raises(MoeSlimError, match=match):
        apply_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")], "no temporary directory is left"
    assert file_hashes(src) == before


def test_plans_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    src = save_sharded("qwen3_moe", tmp_path / "src")
    good = plan_for_model(tiny_model("qwen3_moe"))
    cases = {
        "family": (dict(family="mixtral"), "plan is for family mixtral"),
        "count": (dict(num_experts=16), "plan was made for 16 experts"),
        "names": (dict(layers=[LayerPlan("model.layers.9.mlp", l.keep) for l in good.layers]), "other MoE layers"),
    }
    for name, (change, match) in cases.items():
        plan = ExpertPlan(**{**good.__dict__, **change})
        plan.save(tmp_path / f"{name}.json")
        _expect_refusal(tmp_path, src, tmp_path / f"{name}.json", match)


def test_broken_checkpoints_are_refused_naming_the_file(tmp_path: Path) -> None:
    plan_for_model(tiny_model("qwen3_moe")).save(tmp_path / "plan.json")
    missing = save_sharded("qwen3_moe", tmp_path / "missing")
    shard = sorted(missing.glob("model-*.safetensors"))[1]
    shard.unlink()
    _expect_refusal(tmp_path, missing, tmp_path / "plan.json", f"shard {shard.name} listed in .* is missing")
    truncated = save_sharded("qwen3_moe", tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    _expect_refusal(tmp_path, truncated, tmp_path / "plan.json", f"{shard.name} is truncated: tensor .* ends at byte")


def test_unknown_quantization_is_refused(tmp_path: Path) -> None:
    src = save_sharded("qwen3_moe", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    plan_for_model(tiny_model("qwen3_moe")).save(tmp_path / "plan.json")
    _expect_refusal(tmp_path, src, tmp_path / "plan.json", "quantized with 'gptq'")


def test_every_tensor_keeps_its_own_dtype_on_both_paths(tmp_path: Path) -> None:
    """DeepSeek-V3 stores its router and correction bias in F32 beside bf16 weights: both paths keep each
    tensor's dtype and value (the in-memory path once rounded the F32 ones to the most common dtype)."""
    src = save_sharded("deepseek_v3", tmp_path / "src", dtype=torch.bfloat16, shard="1GB")
    fp32 = tiny_model("deepseek_v3").state_dict()
    sd = load_file(str(src / "model.safetensors"))
    router = [k for k in sd if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))]
    assert router
    for k in router:  # values bf16 cannot hold
        sd[k] = fp32[k] + torch.linspace(0, 1e-3, fp32[k].numel()).reshape(fp32[k].shape)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    plan_for_model(tiny_model("deepseek_v3")).save(tmp_path / "plan.json")
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "s", progress=False)
    apply_checkpoint(src, tmp_path / "plan.json", tmp_path / "m", in_memory=True)
    s, m = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("s", "m"))
    assert s.keys() == m.keys()
    for k in s:
        assert s[k].dtype == m[k].dtype and torch.equal(s[k], m[k]), k
        if k in router:
            assert s[k].dtype == torch.float32
            keep = plan_for_model(tiny_model("deepseek_v3")).layers
            assert any(torch.equal(s[k], sd[k][lp.keep]) for lp in keep if k.startswith(lp.name)), k
    assert {v.dtype for k, v in s.items() if k not in router} == {torch.bfloat16}
