"""SFT recovery: loss goes down, prompt tokens are masked, LoRA merges exactly, pruned structure stays,
bad input gets one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from eval_fixtures import tiny_moe, tiny_tokenizer, write_fixture_data  # noqa: E402

from moe_slim.errors import MoeSlimError
from moe_slim.recover.data import IGNORE, collate, encode_record
from moe_slim.recover.loop import sft
from moe_slim.recover.loss import batch_loss, masked_lm_loss
from moe_slim.recover.modes import lora_expert_parameters, lora_target_modules
from moe_slim.recover.stage import recover

SPLITS = ("train", "validation", "test")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fixture_data(tmp_path_factory.mktemp("sftdata"), n_per_domain=16, splits=SPLITS)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _records(data_dir: Path, n: int = 8) -> list[dict]:
    lines = (data_dir / "translation" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(l) for l in lines[:n]]


def test_few_steps_reduce_loss_on_fixed_batch(tok, data_dir):
    model = tiny_moe(tok)
    recs = _records(data_dir, 4)
    batch = collate([encode_record(tok, r, 128) for r in recs], tok.pad_token_id)
    with torch.no_grad():
        before = float(batch_loss(model, batch))
    res = sft(model, tok, recs, val_data=recs, steps=8, mode="full", lr=3e-3, batch_size=2, grad_accum=2, warmup=2,
              progress=False)
    with torch.no_grad():
        after = float(batch_loss(res.model, batch))
    assert after < before - 0.1, (before, after)
    assert res.metrics_after["val_loss"] < res.metrics_before["val_loss"]
    assert res.steps == 8 and res.tokens > 0
    lrs = [h["lr"] for h in res.history[1:]]  # the schedule advances once per optimizer step, not per micro-batch
    assert lrs[0] == pytest.approx(3e-3 / 2) and lrs[1] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_labels_mask_prompt_and_padding(tok, data_dir):
    rec = _records(data_dir, 1)[0]
    ids, labels = encode_record(tok, rec, 128)
    n_prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and len(ids) > n_prompt
    short = {"prompt": rec["prompt"], "target": "ok"}
    batch = collate([(ids, labels), encode_record(tok, short, 128)], tok.pad_token_id)
    model = tiny_moe(tok)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    logits.requires_grad_(True)
    masked_lm_loss(logits, batch["labels"]).backward()
    grad_norm = logits.grad.abs().sum(-1)  # [B, T]
    # logits at position t predict token t+1: prompt-only predictions and padding get no gradient
    predicts_target = torch.zeros_like(grad_norm, dtype=torch.bool)
    predicts_target[:, :-1] = batch["labels"][:, 1:] != IGNORE
    assert torch.all(grad_norm[~predicts_target] == 0)
    assert torch.all(grad_norm[predicts_target] > 0)
    # the loss does not depend on the logits at those positions
    noisy = logits.detach().clone()
    noisy[~predicts_target] += 10 * torch.randn_like(noisy[~predicts_target])
    torch.testing.assert_close(masked_lm_loss(noisy, batch["labels"]), masked_lm_loss(logits.detach(), batch["labels"]))


def test_lora_merge_equals_adapted_model(tok, data_dir):
    model = tiny_moe(tok)
    targets = lora_target_modules(model)
    assert targets and all("lm_head" not in t and not t.endswith(".gate") for t in targets)
    ids = torch.tensor([tok("<|en|>the cat sees a red house<|de|>die Katze")["input_ids"]])
    with torch.no_grad():
        base = model(input_ids=ids).logits.clone()
    res = sft(model, tok, _records(data_dir, 8), steps=6, mode="lora", lr=1e-2, batch_size=4, warmup=0,
              progress=False)
    adapted = res.model
    with torch.no_grad():
        a = adapted(input_ids=ids).logits
        merged = adapted.merge_and_unload()
        m = merged(input_ids=ids).logits
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter did something
    torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_experts_mode_keeps_pruned_structure(tok, data_dir):
    from moe_slim.experts.plan import make_plan
    from moe_slim.experts.prune import apply_plan
    from moe_slim.families import family_of, moe_layers

    model = tiny_moe(tok, num_experts=8)
    layers = moe_layers(model)
    torch.manual_seed(0)
    plan = make_plan(torch.rand(len(layers), 8), family=family_of(model), config=model.config,
                     layer_names=[l.name for l in layers], ratio=0.5)
    apply_plan(model, plan)
    config = model.config.to_dict()
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." not in n}
    res = sft(model, tok, "translation=0.8,general=0.2", data_dir=data_dir, steps=4, mode="experts", lr=1e-2,
              batch_size=4, progress=False)
    assert res.model is model
    assert model.config.to_dict() == config
    assert {n: tuple(p.shape) for n, p in model.state_dict().items()} == shapes
    assert [l.num_experts for l in moe_layers(model)] == [4] * len(layers)
    for n, p in model.named_parameters():  # attention, norms, embeddings untouched
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert res.trainable_params == sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)


def test_recover_stage_returns_metrics_and_plain_model(tok, data_dir):
    model = tiny_moe(tok)
    metrics = recover(model, tok, {"steps": 3, "mode": "lora", "batch_size": 2, "data": "translation=1"}, data_dir)
    assert metrics["sft/steps"] == 3 and "sft/val_loss_after" in metrics
    assert metrics["sft/val_loss_after"] <= metrics["sft/val_loss_before"]
    assert not any("lora" in n for n, _ in model.named_parameters())
    with pytest.raises(MoeSlimError, match="unknown key"):
        recover(model, tok, {"steps": 3, "stepz": 1}, data_dir)


def test_bad_input_one_line(tok, data_dir, tmp_path):
    model = tiny_moe(tok)
    for steps in (0, -3):
        with pytest.raises(MoeSlimError, match="steps"):
            sft(model, tok, _records(data_dir), steps=steps, progress=False)
    with pytest.raises(MoeSlimError, match="empty"):
        sft(model, tok, [], steps=2, progress=False)
    empty = tmp_path / "d"
    (empty / "translation").mkdir(parents=True)
    (empty / "translation" / "train.jsonl").write_text("")
    with pytest.raises(MoeSlimError, match="empty") as exc:
        sft(model, tok, "translation=1", data_dir=empty, steps=2, progress=False)
    assert "\n" not in str(exc.value)
    with pytest.raises(MoeSlimError, match="mode"):
        sft(model, tok, _records(data_dir), steps=2, mode="everything", progress=False)


def test_cli_rejects_non_model_and_writes_checkpoint(tok, data_dir, tmp_path, capsys):
    from moe_slim.cli import main
    from moe_slim.modeling.loading import load_model

    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    out = tmp_path / "out"
    assert main(["sft", str(notmodel), "--data", "translation=1", "--data-dir", str(data_dir), "--steps", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-slim:") and "\n" not in err and not out.exists()
    assert main(["sft", str(notmodel), "--data", "translation=1", "--steps", "0", "--out", str(out)]) == 2
    assert "steps" in capsys.readouterr().err and not out.exists()

    from eval_fixtures import save_checkpoint as save_fixture

    ckpt = save_fixture(tiny_moe(tok), tok, tmp_path / "ckpt")
    assert main(["sft", str(ckpt), "--data", "translation=0.8,general=0.2", "--data-dir", str(data_dir),
                 "--steps", "3", "--batch-size", "2", "--chrf-limit", "1", "--out", str(out)]) == 0
    # chrF is printed with its paired-bootstrap difference and n (1 sentence per pair, 3 pairs)
    said = capsys.readouterr().out
    assert re.search(r"chrF \d+\.\d\d -> \d+\.\d\d \([+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\], "
                     r"paired bootstrap, n = 3 sentences\)", said), said
    card = (out / "README.md").read_text()
    assert "Mode: `experts`" in card and "translation=0.8,general=0.2" in card and "| chrf |" in card
    log = json.loads((out / "sft.json").read_text())
    assert log["steps"] == 3 and "val_loss" in log["metrics_after"]
    a, b = log["metrics_after"], log["metrics_before"]
    assert a["chrf_n"] == b["chrf_n"] == 3 and a["chrf_delta"] == pytest.approx(a["chrf"] - b["chrf"], abs=1e-9)
    assert a["chrf_delta_lo"] <= a["chrf_delta"] <= a["chrf_delta_hi"]
    reloaded, _ = load_model(out)
    assert reloaded.config.num_experts == 4

    adapter = tmp_path / "adapter"
    assert main(["sft", str(ckpt), "--data", "translation=1", "--data-dir", str(data_dir), "--steps", "2",
                 "--batch-size", "2", "--mode", "lora", "--chrf-limit", "0", "--out", str(adapter), "--quiet"]) == 0
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == ckpt.resolve()
    assert "PeftModel.from_pretrained" in (adapter / "README.md").read_text()


def test_early_stopping_restores_best_and_time_limit(tok, data_dir):
    model = tiny_moe(tok)
    recs = _records(data_dir, 8)
    # an absurd learning rate makes validation worse: patience stops the run, the best (initial) weights return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = sft(model, tok, recs, val_data=recs[:2], steps=50, mode="full", lr=5.0, warmup=0, eval_every=1,
              patience=2, max_grad_norm=None, progress=False)
    assert res.stopped_early and res.steps < 50 and res.best_step == 0
    assert all(torch.equal(p, before[n]) for n, p in res.model.named_parameters())
    res = sft(tiny_moe(tok), tok, recs, steps=1000, mode="experts", max_minutes=1e-4, progress=False)
    assert res.steps < 1000 and res.history[-1].get("time_limit")


@pytest.mark.parametrize("model_type", __import__("moe_slim.modeling.tiny", fromlist=["TINY_FAMILIES"]).TINY_FAMILIES)
def test_experts_mode_every_family(model_type):
    from moe_slim.families import moe_layers
    from moe_slim.modeling.tiny import tiny_model
    from moe_slim.modeling.tiny import tiny_tokenizer as char_tokenizer

    tok = char_tokenizer()
    model = tiny_model(model_type, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    recs = [{"prompt": f"<|en|>cat {i}<|de|>", "target": f"Katze {i}<|end|>"} for i in range(12)]
    blocks = tuple(l.name + "." for l in moe_layers(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = sft(model, tok, recs, steps=2, mode="experts", lr=1e-2, batch_size=4, seq_len=64, warmup=0,
              patience=None, progress=False)
    assert all(math.isfinite(h.get("train_loss", 0.0)) for h in res.history)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(blocks) for n in changed), sorted(changed - {n for n in changed
                                                                                      if n.startswith(blocks)})


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_lora_on_fused_experts_merges_exactly(model_type):
    from moe_slim.modeling.tiny import tiny_model
    from moe_slim.modeling.tiny import tiny_tokenizer as char_tokenizer

    tok = char_tokenizer()
    model = tiny_model(model_type, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    recs = [{"prompt": f"<|en|>cat {i}<|de|>", "target": f"Katze {i}<|end|>"} for i in range(12)]
    res = sft(model, tok, recs, steps=3, mode="lora", lora_experts=True, lr=1e-2, batch_size=4, seq_len=64,
              warmup=0, patience=None, progress=False)
    assert res.lora["expert_parameters"]
    assert any(float(p.abs().sum()) > 0 for n, p in res.model.named_parameters() if "lora_B" in n and "experts" in n)
    ids = torch.tensor([tok("<|en|>cat 3<|de|>Ka")["input_ids"]])
    with torch.no_grad():
        a = res.model(input_ids=ids).logits
        m = res.model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)


def test_lora_on_flat_experts_is_refused_in_one_line():
    """peft wraps the module holding DBRX's flat expert matrices, whose forward reads them as attributes."""
    from moe_slim.modeling.tiny import tiny_model

    with pytest.raises(MoeSlimError, match="dbrx.+flat.+--mode experts"):
        lora_expert_parameters(tiny_model("dbrx"))
