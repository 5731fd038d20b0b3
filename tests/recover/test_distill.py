"""Distillation recovery: the KL loss's math, router-only training, the teacher top-k cache (in memory and
layer by layer give the same file; a cached run equals an on-the-fly run), the CLI, stage and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval_fixtures import save_checkpoint as save_fixture
from eval_fixtures import tiny_moe, tiny_tokenizer, write_fixture_data

from moe_slim.errors import MoeSlimError
from moe_slim.recover.distill import ModelTeacher, TopK, kl_to_teacher, top_k
from moe_slim.recover.loop import sft
from moe_slim.recover.stage import recover
from moe_slim.recover.teacher_cache import CachedTeacher, build_teacher_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MIX = "translation=0.8,general=0.2"
SMALL = dict(batch_size=2, seq_len=48, val_examples=4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fixture_data(tmp_path_factory.mktemp("kddata"), n_per_domain=16, splits=("train", "validation", "test"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_kl_matches_definition_and_top_k_partition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pt, ls, lt = t.softmax(-1), s.log_softmax(-1), t.log_softmax(-1)
    manual = (pt * (lt - ls)).sum(-1)[mask.bool()].mean()
    assert torch.allclose(kl_to_teacher(s, lt, mask), manual, atol=1e-6)
    assert float(kl_to_teacher(t, lt, mask)) == pytest.approx(0.0, abs=1e-6)
    # k = vocabulary: the partition is the whole distribution, so the top-k KL is the full KL
    v, i = lt.topk(11, -1)
    assert torch.allclose(kl_to_teacher(s, TopK(v, i), mask), manual, atol=1e-5)
    # k < vocabulary: the KL of the coarsened distributions (top-k tokens + the rest as one bucket)
    v, i = lt.topk(3, -1)
    ps = ls.exp()
    coarse_t = torch.cat([v.exp(), 1 - v.exp().sum(-1, keepdim=True)], -1)
    coarse_s = torch.cat([ps.gather(-1, i), 1 - ps.gather(-1, i).sum(-1, keepdim=True)], -1)
    want = (coarse_t * (coarse_t.log() - coarse_s.log())).sum(-1)[mask.bool()].mean()
    got = kl_to_teacher(s, TopK(v, i), mask)
    assert torch.allclose(got, want, atol=1e-5) and float(got) <= float(manual) + 1e-6


def test_router_mode_trains_only_routers_and_kd_lowers_validation_kl(tok, data_dir):
    teacher = tiny_moe(tok)
    student = tiny_moe(tok, seed=1)  # a different model: its KL to the teacher is far from 0
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = sft(student, tok, MIX, data_dir=data_dir, steps=6, mode="router", loss="kd", teacher=teacher, lr=5e-2,
              eval_every=2, progress=False, **SMALL)
    changed = {n for n, p in res.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("mlp.gate.weight") for n in changed), changed
    assert res.trainable_params == sum(p.numel() for n, p in student.named_parameters() if n.endswith("mlp.gate.weight"))
    assert res.metrics_after["val_kd"] < res.metrics_before["val_kd"]
    assert res.loss == "kd" and res.teacher["kind"] == "model, on the fly"
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher's flags are left alone


def test_cache_in_memory_equals_layerwise_and_cached_run_equals_on_the_fly(tok, data_dir, tmp_path):
    teacher = tiny_moe(tok)
    ckpt = save_fixture(teacher, tok, tmp_path / "teacher")
    kw = dict(steps=3, data_dir=data_dir, k=8, **SMALL)
    mem = build_teacher_cache(teacher, tok, MIX, tmp_path / "mem.safetensors", **kw)
    lw = build_teacher_cache(ckpt, tok, MIX, tmp_path / "lw.safetensors", layerwise=True, **kw)
    from safetensors.torch import load_file

    a, b = load_file(str(mem.path)), load_file(str(lw.path))
    assert set(a) == set(b) and any(k.startswith("v") for k in a)
    for name in a:
        if name.endswith((".ids", ".idx")):
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name].float(), b[name].float(), atol=2e-3), name
    stamp = mem.path.stat().st_mtime_ns
    assert build_teacher_cache(teacher, tok, MIX, mem.path, **kw).path.stat().st_mtime_ns == stamp  # reused

    runs = []
    for t in (ModelTeacher(teacher, k=8), CachedTeacher(mem.path)):
        student = tiny_moe(tok, seed=1)
        runs.append(sft(student, tok, MIX, data_dir=data_dir, steps=3, mode="experts", loss="kd+ce", teacher=t,
                        lr=1e-2, eval_every=1, progress=False, **SMALL))
    sa, sb = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert runs[0].history == runs[1].history
    with pytest.raises(MoeSlimError, match="other batches"):  # another seed draws other batches
        sft(tiny_moe(tok, seed=1), tok, MIX, data_dir=data_dir, steps=3, loss="kd", teacher=CachedTeacher(mem.path),
            seed=5, progress=False, **SMALL)


def test_top_k_keeps_the_largest():
    lp = torch.log_softmax(torch.randn(1, 2, 20), -1)
    t = top_k(lp, 4)
    assert t.logprobs.dtype == torch.float16 and t.indices.dtype == torch.int32
    assert torch.equal(t.indices.long(), lp.topk(4, -1).indices)


def test_stage_needs_source_and_bad_inputs_one_line(tok, data_dir):
    student, teacher = tiny_moe(tok, seed=1), tiny_moe(tok)
    with pytest.raises(MoeSlimError, match="teacher"):
        sft(student, tok, MIX, data_dir=data_dir, steps=1, loss="kd", progress=False)
    with pytest.raises(MoeSlimError, match="loss"):
        sft(student, tok, MIX, data_dir=data_dir, steps=1, loss="mse", teacher=teacher, progress=False)
    spec = {"sft": {"steps": 1, "loss": "kd", **SMALL}}
    with pytest.raises(MoeSlimError, match="source"):
        recover(student, tok, spec, data_dir=data_dir)
    metrics = recover(student, tok, spec, data_dir=data_dir, source=teacher)
    assert "sft/val_kd_after" in metrics
    with pytest.raises(MoeSlimError, match="teacher"):
        recover(student, tok, {"sft": {"steps": 1, "teacher": "elsewhere"}}, data_dir=data_dir)


def test_cli_kd_writes_card_with_loss_and_teacher(tok, data_dir, tmp_path, capsys):
    from moe_slim.cli import main

    teacher = save_fixture(tiny_moe(tok), tok, tmp_path / "teacher")
    student = save_fixture(tiny_moe(tok, seed=1), tok, tmp_path / "student")
    capsys.readouterr()  # the fixtures' save progress bars
    out = tmp_path / "out"
    base = ["sft", str(student), "--mix", MIX, "--data-dir", str(data_dir), "--steps", "2", "--batch-size", "2",
            "--seq-len", "48", "--chrf-limit", "0", "--quiet", "--out", str(out)]
    assert main(base + ["--loss", "kd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-slim:") and "--teacher" in err and "\n" not in err and not out.exists()
    other = save_fixture(tiny_moe(tok, vocab_size=len(tok) + 3), tok, tmp_path / "other")
    capsys.readouterr()
    assert main(base + ["--teacher", str(other)]) == 2
    assert "vocabulary" in capsys.readouterr().err and not out.exists()
    assert main(base + ["--teacher", str(teacher), "--mode", "router", "--layerwise-teacher"]) == 0
    card = (out / "README.md").read_text()
    assert "Loss: `kd`" in card and "top-k cache" in card and "| val_kd |" in card
    log = json.loads((out / "sft.json").read_text())
    assert log["loss"] == "kd" and log["teacher"]["source"] == str(teacher) and log["teacher"]["topk"] == 64


def test_sweep_command_distils_from_the_sweep_model():
    from moe_slim.cli import build_parser
    from moe_slim.sweep.targets import command_for

    row = {"kind": "prune", "method": "reap", "ratio": 0.75,
           "config": {"mix": {"translation": 1}, "recover": {"sft": {"steps": 5, "loss": "kd", "mode": "router"}}}}
    cmd = command_for(row, {"model": "orig/", "stats_dir": "stats/", "data_dir": "data"})
    sft_cmd = cmd.split(" && ", 1)[1].split()
    assert sft_cmd[:2] == ["moe-slim", "sft"] and "--teacher orig/" in cmd and "--loss kd" in cmd
    args = build_parser().parse_args(sft_cmd[1:])  # the command the report prints parses
    assert args.teacher == "orig/" and args.loss == "kd" and args.mode == "router"
