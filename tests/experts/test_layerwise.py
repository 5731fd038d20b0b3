"""Layer-wise observation equals whole-model observation on every family, resumes after an interruption,
and spills layer outputs to disk; the merge-sample reservoir gives the same sample however its stream is split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_slim.errors import MoeSlimError
from moe_slim.experts.observe import observe, observe_layerwise
from moe_slim.experts.reservoir import Reservoir, combine
from moe_slim.modeling.loading import load_model
from moe_slim.modeling.materialize import WeightSource
from moe_slim.modeling.tiny import TINY_FAMILIES, save_tiny

TEXTS = {
    "general": ["the quick brown fox jumps over the lazy dog " * 3, "hello world, this is a test of things"] * 3,
    "code": ["def f(x):\n    return x + 1\n" * 2, "for i in range(10): print(i)"] * 3,
}
SETTINGS = dict(seq_len=16, batch_size=2, samples=50)


def assert_same_stats(a, b, exact: bool = False) -> None:
    """Counts (routing decisions) equal; float sums and samples equal to float32 rounding.

    The two paths do the same float32 computations on the same inputs, but transformers 5.2x's
    attention and expert kernels round differently with the inputs' memory layout (a cached layer
    output vs a view inside the forward): measured differences are below 3e-8 relative.
    ``exact`` demands bit equality (two runs of the same path)."""
    assert a.domains.keys() == b.domains.keys()
    for d in a.domains:
        assert a.domains[d].keys() == b.domains[d].keys()
        for f, t in a.domains[d].items():
            u = b.domains[d][f]
            if exact or f in ("tokens", "count"):
                assert torch.equal(t, u), (d, f)
            elif f == "out_sum":  # sums of output vectors cancel elementwise: compare at the field's own scale
                torch.testing.assert_close(t, u, rtol=1e-6, atol=1e-6 * float(t.abs().max()), msg=f"{d} {f}")
            else:
                torch.testing.assert_close(t, u, rtol=1e-6, atol=1e-7, msg=f"{d} {f}")
    sa, sb = a.samples.tensors(), b.samples.tensors()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact or not sa[k].is_floating_point():
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-5, msg=k)
    assert a.meta["model_fingerprint"] == b.meta["model_fingerprint"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: save_tiny(f, root / f) for f in TINY_FAMILIES}


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_layerwise_equals_whole_model(models, model_type: str, one_torch_thread) -> None:
    model, tok = load_model(models[model_type])
    whole = observe(model, tok, TEXTS, **SETTINGS)
    layerwise = observe_layerwise(models[model_type], tok, TEXTS, **SETTINGS)
    assert_same_stats(whole, layerwise)
    assert layerwise.meta["layerwise"]["dtype"] == "float32"


def test_resume_after_an_interruption_and_spill_to_disk(models, tmp_path: Path, monkeypatch, one_torch_thread) -> None:
    path = models["switch_transformers"]  # encoder and decoder stacks: the encoder output is part of the state
    _, tok = load_model(path)
    reference = observe_layerwise(path, tok, TEXTS, **SETTINGS)
    work = tmp_path / "work"
    loads: list[str] = []
    real_load = WeightSource.load

    def failing_load(self, module, *a, **k):
        loads.append(module)
        if module == "decoder.block.1":
            raise KeyboardInterrupt
        return real_load(self, module, *a, **k)

    monkeypatch.setattr(WeightSource, "load", failing_load)
    with pytest.raises(KeyboardInterrupt):
        observe_layerwise(path, tok, TEXTS, **SETTINGS, work_dir=work, cache_bytes=0)
    assert (work / "state.json").is_file() and (work / "encoder").is_dir()
    monkeypatch.setattr(WeightSource, "load", lambda self, module, *a, **k: (loads.append(module),
                                                                             real_load(self, module, *a, **k))[1])
    loads.clear()
    resumed = observe_layerwise(path, tok, TEXTS, **SETTINGS, work_dir=work, cache_bytes=0)
    assert loads == ["decoder.block.1"], "only the unfinished layer is run again"
    assert resumed.meta["layerwise"]["resumed_after"] == [1, 0]
    assert_same_stats(reference, resumed, exact=True)
    assert not work.exists(), "a finished run removes its work directory"


def test_a_work_directory_of_another_run_is_refused(models, tmp_path: Path, monkeypatch) -> None:
    path = models["qwen3_moe"]
    _, tok = load_model(path)
    real_load = WeightSource.load

    def stop_at_second(self, module, *a, **k):
        if module == "model.layers.1":
            raise KeyboardInterrupt
        return real_load(self, module, *a, **k)

    monkeypatch.setattr(WeightSource, "load", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        observe_layerwise(path, tok, TEXTS, **SETTINGS, work_dir=tmp_path / "w")
    monkeypatch.setattr(WeightSource, "load", real_load)
    with pytest.raises(MoeSlimError, match="holds a layer-wise run of another model, text or settings"):
        observe_layerwise(path, tok, {"general": TEXTS["general"]}, **SETTINGS, work_dir=tmp_path / "w")


def test_reservoir_sample_does_not_depend_on_how_the_stream_is_split() -> None:
    rows = torch.arange(500, dtype=torch.float32).unsqueeze(1)
    one = Reservoir(64, seed=7)
    for a in range(0, 500, 37):  # one process, uneven calls
        take, slots = one.plan(min(37, 500 - a))
        one.put("x", slots, rows[a:a + 37][take])
    parts = []
    for rank in range(3):  # three processes, each every third chunk of 50 rows
        res = Reservoir(64, seed=7)
        for a in range(rank * 50, 500, 150):
            take, slots = res.plan(50, start=a)
            res.put("x", slots, rows[a:a + 50][take])
        parts.append((res.position, res.data))
    assert torch.equal(combine(parts)["x"], one.result()["x"])


def test_reservoir_is_uniform_over_the_stream() -> None:
    counts = torch.zeros(200)
    for seed in range(400):
        res = Reservoir(20, seed=seed)
        _, slots = res.plan(200)
        counts[res.position[res.position >= 0]] += 1
    expected = 400 * 20 / 200
    assert float(counts.mean()) == pytest.approx(expected)
    assert float(counts.std()) < 0.35 * expected  # binomial sd is sqrt(40 * 0.9) = 6, 15% of 40


@pytest.mark.parametrize("extra, match", [
    (["--device", "cuda"], "has no CUDA GPU"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_observe_refuses_devices_and_dtypes_it_cannot_use(models, tmp_path: Path, capsys, extra, match) -> None:
    from moe_slim.cli import main

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is valid here")
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "hello world"}\n')
    rc = main(["observe", str(models["qwen3_moe"]), "--calib", f"general={calib}", "--out", str(tmp_path / "s"),
               "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("moe-slim: ") and match in err[0]
    assert not (tmp_path / "s").exists()


def test_layerwise_needs_safetensors(tmp_path: Path, capsys) -> None:
    from moe_slim.cli import main
    from moe_slim.modeling.tiny import tiny_model, tiny_tokenizer

    path = tmp_path / "bin-only"
    tiny_model("qwen3_moe").config.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    torch.save({}, path / "pytorch_model.bin")
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "hello world"}\n')
    rc = main(["observe", str(path), "--calib", f"general={calib}", "--out", str(tmp_path / "s"), "--layerwise"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"moe-slim: layer-wise observation reads safetensors weights and {path} has none "
                               "(convert it to safetensors, or observe without --layerwise)"]


def test_a_dtype_the_device_cannot_run_is_one_line(monkeypatch) -> None:
    from moe_slim.modeling import devices

    def broken(*a, **k):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nmore')

    monkeypatch.setattr(torch.Tensor, "__matmul__", broken)
    with pytest.raises(MoeSlimError, match=r"device cpu cannot compute in float16 \(\"addmm_impl_cpu_\" not implemented"):
        devices.check_runs(torch.device("cpu"), torch.float16)


#: hybrid stacks: linear attention (Gated DeltaNet, KDA), Mamba, short convolutions and other recurrent layers
#: between MoE layers
HYBRID = ("qwen3_next", "qwen3_5_moe", "jamba", "nemotron_h", "lara_mini", "lfm2_moe", "kimi_linear", "granitemoehybrid",
          "bailing_hybrid", "qwen4_exp", "inkling2")
#: per-layer configs and layers that pass more than the hidden state on: dots3 (its sliding layers have their own
#: head counts), Gemma-4 (per-layer attention config, per-layer input embeddings, the MoE block is the decoder
#: layer), Zaya (each router reads the previous one's state)
PER_LAYER = ("dots3_note", "gemma4", "zaya")


@pytest.mark.parametrize("model_type", HYBRID + PER_LAYER)
def test_layerwise_equals_whole_model_on_hybrid_stacks(model_type: str, tmp_path: Path, one_torch_thread) -> None:
    """Each layer runs on its own with the conv and recurrent states it builds itself (no cache is
    carried between layers during observation), and with what its predecessor hands it beside the hidden
    state, so the per-layer path matches the whole model."""
    path = save_tiny(model_type, tmp_path / model_type)
    model, tok = load_model(path)
    whole = observe(model, tok, TEXTS, **SETTINGS)
    layerwise = observe_layerwise(path, tok, TEXTS, **SETTINGS)
    assert_same_stats(whole, layerwise)


@pytest.mark.parametrize("model_type", ["deepseek_v4", "longcat_flash"])
def test_layerwise_equals_whole_model_on_token_routed_and_zero_expert_layers(model_type: str, tmp_path: Path,
                                                                            one_torch_thread) -> None:
    """DeepSeek-V4's hash layers read the token ids inside each layer (and its on-disk ``model.norm`` is not
    renamed to a ``kv_norm``); LongCat routes to zero-computation experts beside the real ones."""
    path = save_tiny(model_type, tmp_path / model_type)
    model, tok = load_model(path)
    assert_same_stats(observe(model, tok, TEXTS, **SETTINGS), observe_layerwise(path, tok, TEXTS, **SETTINGS))


def _image_text_types() -> list[str]:
    from moe_slim.families.catalog import moe_model_types
    from moe_slim.families.table import REFUSED, UNTESTED

    from transformers import AutoConfig

    return [mt for mt, kind in moe_model_types().items() if kind == "image-text" and mt not in {**REFUSED, **UNTESTED}
            and hasattr(AutoConfig.for_model(mt), "text_config")]  # Mistral-4's image-text class is its causal LM


@pytest.mark.parametrize("model_type", _image_text_types())
def test_layerwise_equals_whole_model_on_image_text_models(model_type: str, tmp_path: Path, one_torch_thread,
                                                          monkeypatch) -> None:
    """A whole image-text checkpoint (vision tower beside the language model) loads through its own class and
    observes on text alone, layer by layer as in one forward; the vision tower's weights are never read."""
    from moe_slim.families import non_text_parts
    from moe_slim.modeling.ondisk import DiskLayout, meta_model
    from moe_slim.modeling.shards import ShardedCheckpoint

    path = save_tiny(model_type, tmp_path / model_type)
    model, tok = load_model(path)
    towers = non_text_parts(model)
    assert towers and hasattr(model.config, "text_config")
    whole = observe(model, tok, TEXTS, **SETTINGS)
    read: list[str] = []
    tensor = ShardedCheckpoint.tensor
    monkeypatch.setattr(ShardedCheckpoint, "tensor", lambda self, key, *a, **k: read.append(key) or tensor(self, key, *a, **k))
    layerwise = observe_layerwise(path, tok, TEXTS, **SETTINGS)
    assert_same_stats(whole, layerwise)
    layout = DiskLayout(meta_model(model.config), ShardedCheckpoint(path).keys)
    vision = {k for k, d in layout.tensors.items() if d.memory_key.startswith(tuple(f"{t}." for t in towers))}
    assert vision and read and not vision & set(read), "layer-wise observation read the vision tower"
