"""Shared pieces of the memory benchmarks: a generated ~1.85 GB Qwen3-MoE (or Qwen3-Next: the same
sizes in a hybrid stack, three Gated DeltaNet layers to one full-attention layer) and a peak-RSS runner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple


#: what a Qwen3-Next of the same sizes adds: linear-attention heads and a shared expert
QWEN3_NEXT = dict(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
                  linear_conv_kernel_dim=4, shared_expert_intermediate_size=384, full_attention_interval=4)


def build_model(path: Path, layers: int = 8, experts: int = 96, family: str = "qwen3_moe") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_slim.modeling.tiny import tiny_tokenizer

    extra = QWEN3_NEXT if family == "qwen3_next" else {}
    config = AutoConfig.for_model(
        family, **extra, vocab_size=151936, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
        num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=experts,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path), max_shard_size="300MB")
    tiny_tokenizer().save_pretrained(str(path))


class Measured(NamedTuple):
    rss: float  # peak RSS, MB
    wall: float  # seconds
    cpu: float  # user + system CPU seconds
    stdout: str
    stderr: str = ""  # without the /usr/bin/time line


def run(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time; return (peak RSS in MB, wall seconds)."""
    m = run_with_output(cmd)
    return m.rss, m.wall


def run_with_output(cmd: list[str], env: dict[str, str] | None = None) -> Measured:
    """:func:`run`, with the command's CPU time and standard output (``env``: added to the environment)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", *cmd], capture_output=True, text=True,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rss, user, system = proc.stderr.strip().splitlines()[-1].split()
    return Measured(int(rss) / 1024, wall, float(user) + float(system), proc.stdout,
                    "\n".join(proc.stderr.strip().splitlines()[:-1]))


def source_model(work: Path, layers: int = 8, family: str = "qwen3_moe") -> Path:
    """The generated checkpoint under ``work/source`` (``layers`` decoder layers), built (once) when missing."""
    src = work / ("source" if family == "qwen3_moe" else f"source-{family}")
    if not (src / "config.json").is_file():
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        build_model(src, layers, family=family)
        print(f"built {src} in {time.perf_counter() - t0:.0f}s")
    return src


def write_calib(path: Path, lines: int) -> Path:
    """A JSONL calibration file of ``lines`` 60-word texts (synthetic: memory, not quality, is measured)."""
    import json

    words = "the quick brown fox jumps over the lazy dog while code and math and prose interleave".split()
    path.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n"
                            for i in range(lines)))
    return path


def baseline_rss() -> float:
    """Peak RSS (MB) of a process that only imports torch, transformers and moe_slim's rewrite and merge
    code: the interpreter-and-libraries floor every command starts from."""
    return run([sys.executable, "-c", "import torch, transformers, accelerate; "
                "import moe_slim.api, moe_slim.checkpoint.rewrite, moe_slim.experts.merge.at_size"])[0]
