"""Merging averages expert weights, so a quantized (FP8, MXFP4) checkpoint cannot be merged as it is:
merging at size, merging in memory and applying a merge plan all refuse it with the same one line,
before any work and with nothing written (at size once ended in a traceback; in memory once wrote
a silently dequantized checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_rewrite import _fp8_checkpoint, _mxfp4_checkpoint, file_hashes

from moe_slim.api import apply_checkpoint, merge_checkpoint
from moe_slim.errors import MoeSlimError
from moe_slim.modeling.tiny import save_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = {"general": ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, they said"]}
KW = dict(method="hc-smoe", ratio=0.5, calib=TEXTS, seq_len=16, batch_size=2, max_tokens=64, align_tokens=32,
          device="cpu")


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_every_merge_path_refuses_a_quantized_checkpoint_in_one_line(kind: str, tmp_path: Path) -> None:
    model_type = {"mxfp4": "gpt_oss", "fp8": "deepseek_v3"}[kind]
    src = (_mxfp4_checkpoint if kind == "mxfp4" else _fp8_checkpoint)(tmp_path / "src")
    plain = save_tiny(model_type, tmp_path / "plain")
    merge_checkpoint(plain, tmp_path / "plan", plan_only=True, **KW)  # a merge plan for the same shapes
    shutil.rmtree(plain)
    before = file_hashes(src)
    messages = []
    for name, run in {
        "at size": lambda out: merge_checkpoint(src, out, **KW),
        "in memory": lambda out: merge_checkpoint(src, out, in_memory=True, **KW),
        "apply": lambda out: apply_checkpoint(src, tmp_path / "plan" / "plan.json", out, progress=False),
        "apply in memory": lambda out: apply_checkpoint(src, tmp_path / "plan" / "plan.json", out, in_memory=True),
    }.items():
        out = tmp_path / name.replace(" ", "_")
        with pytest.raises(MoeSlimError) as err:
            run(out)
        messages.append(str(err.value))
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp*")), name
    assert file_hashes(src) == before
    assert len(set(messages)) == 1, messages
    (line,) = messages[0].splitlines()
    assert f"quantized ({kind})" in line and "dequantize" in line
