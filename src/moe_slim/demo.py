"""``make demo``: observe -> prune -> evaluate on the reference MoE, end to end through the API.

On the shipped reference model (models/reference/): observe the four domains once, prune 25/50/75%
with REAP calibrated on translation and on general text (in memory, from the one set of
statistics), evaluate each with the quick suite, and print chrF, MC accuracy, perplexity and
parameter count per configuration. Without the reference model the demo falls back to a small
RANDOMLY INITIALISED Qwen3-MoE and says so: observe -> prune -> reload -> generate.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .api import observe_checkpoint, prune_checkpoint
from .criteria import score
from .prompts import translation_prompt
from .prune import count_parameters
from .tiny import save_tiny

RUN_DIR = Path("runs/demo")
DOMAINS = ("general", "math", "code", "translation")


def _calibration_files(data_dir: Path, out: Path, per_domain: int) -> str:
    """A ``domain=file`` spec over the built data's calibration split (first texts of each domain)."""
    parts = []
    for d in DOMAINS:
        src = data_dir / d / "calibration.jsonl"
        if not src.exists():
            continue
        lines = src.read_text(encoding="utf-8").splitlines()[:per_domain]
        dst = out / f"{d}.jsonl"
        dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
        parts.append(f"{d}={dst}")
    if not parts:
        sys.exit(f"moe-slim: no calibration data under {data_dir} (run `make data`)")
    return ",".join(parts)


def reference_demo(model_dir: Path, data_dir: str, limit: int | None = None) -> int:
    """The demo on the reference MoE: one observation, six pruned variants, one table."""
    import copy

    from .api import plan_for
    from .evaluate import evaluate
    from .loading import load_model
    from .observe import observe
    from .prune import apply_plan
    from .reference import calibration_texts

    print(f"moe_slim demo on the reference MoE ({model_dir})\n")
    model, tok = load_model(model_dir)
    t = time.perf_counter()
    stats = observe(model, tok, calibration_texts(data_dir, 256), seq_len=256, batch_size=8)
    print(f"observe: {stats.n_layers} MoE layers x {stats.n_experts} experts, tokens per domain "
          f"{ {d: int(v) for d, v in stats.meta['tokens_per_domain'].items()} } in {time.perf_counter() - t:.0f}s")
    configs: list[tuple[str, str, float | None]] = [("original", "-", None)]
    configs += [("reap", calib, r) for calib in ("translation", "general") for r in (0.25, 0.5, 0.75)]
    rows = []
    for method, calib, ratio in configs:
        t = time.perf_counter()
        m = model
        if ratio is not None:
            m = copy.deepcopy(model)
            apply_plan(m, plan_for(m, stats, criterion=method, ratio=ratio, mix={calib: 1.0}))
        res = evaluate(m, tok, "quick", data_dir=data_dir, limit=limit)
        met = res["metrics"]
        mc = [v for k, v in met.items() if k.endswith("/acc") and not k.startswith("translation")]
        rows.append({
            "config": "original" if ratio is None else f"{method} {int(ratio * 100)}%", "calibration": calib,
            "experts": stats.n_experts if ratio is None else round(stats.n_experts * (1 - ratio)),
            "chrf": met.get("translation/chrf"), "mc_acc": sum(mc) / len(mc) if mc else None,
            "ppl": met.get("perplexity/ppl"), "params": count_parameters(m), "seconds": time.perf_counter() - t,
        })
        r = rows[-1]
        print(f"  {r['config']:10s} {calib:12s} chrF {r['chrf']:.2f}  MC acc {r['mc_acc']:.3f}  ppl {r['ppl']:.2f}"
              f"  ({r['seconds']:.0f}s)", flush=True)
    print("\n| configuration | calibrated on | experts/layer | chrF | MC acc (mean of 4) | perplexity | parameters |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['calibration']} | {r['experts']} | {r['chrf']:.2f} | {r['mc_acc']:.3f} | "
              f"{r['ppl']:.2f} | {r['params']:,} |")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / "demo_table.json").write_text(json.dumps(rows, indent=1))
    print(f"\ntable saved to {RUN_DIR / 'demo_table.json'}")
    return 0


def main(data_dir: str = "data") -> int:
    from .reference import REFERENCE_DIR

    if (REFERENCE_DIR / "config.json").exists():
        return reference_demo(REFERENCE_DIR, data_dir)
    print("moe_slim demo — NOTE: the model here is a small Qwen3-MoE with RANDOMLY INITIALISED weights.")
    print("It shows the pipeline (observe -> prune -> reload -> generate), not translation quality.\n")
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    RUN_DIR.mkdir(parents=True)
    model_dir = RUN_DIR / "model"
    save_tiny("qwen3_moe", model_dir, seed=0, hidden_size=64, num_hidden_layers=4, num_experts=16,
              num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=512)
    spec = _calibration_files(Path(data_dir), RUN_DIR, per_domain=64)

    t = time.perf_counter()
    stats = observe_checkpoint(model_dir, spec, RUN_DIR / "stats", seq_len=128, batch_size=8, progress=False)
    print(f"observe: {stats.n_layers} MoE layers x {stats.n_experts} experts, tokens per domain "
          f"{ {d: int(v) for d, v in stats.meta['tokens_per_domain'].items()} } in {time.perf_counter() - t:.1f}s")

    overlap = []
    rows = []
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    rows.append(("original", "-", "-", base.config.num_experts, count_parameters(base)))
    for calib in ("translation", "general"):
        if calib not in stats.domains:
            continue
        for ratio in (0.25, 0.5, 0.75):
            out = RUN_DIR / f"reap-{calib}-{int(ratio * 100)}"
            plan = prune_checkpoint(model_dir, RUN_DIR / "stats", out, criterion="reap", ratio=ratio,
                                    mix={calib: 1.0})
            rows.append((f"reap {int(ratio*100)}%", calib, str(plan.kept_counts), plan.kept_counts[0],
                         plan.info["params_after"]))
    if {"translation", "general"} <= set(stats.domains):
        st = score(stats, "reap", mix={"translation": 1})
        sg = score(stats, "reap", mix={"general": 1})
        k = stats.n_experts // 2
        for l in range(stats.n_layers):
            a = set(torch.argsort(st[l], descending=True)[:k].tolist())
            b = set(torch.argsort(sg[l], descending=True)[:k].tolist())
            overlap.append(len(a & b))

    print("\n| model | calibrated on | experts kept per layer | experts/layer | parameters |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:,} |")
    if overlap:
        print(f"\nTop-50% REAP experts shared between translation and general calibration, per layer: {overlap} "
              f"of {stats.n_experts // 2}")

    out = RUN_DIR / "reap-translation-50"
    if out.exists():
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
        prompt = translation_prompt("The file could not be opened.", "de")
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"\nreloaded {out} through AutoModelForCausalLM ({model.config.num_experts} experts/layer) and generated:")
        print(f"  prompt: {prompt!r}\n  output: {text!r}  (random weights: gibberish is expected)")
    print(f"\nplans and model cards: {RUN_DIR}/*/plan.json, README.md")
    (RUN_DIR / "summary.json").write_text(json.dumps({"rows": rows, "overlap": overlap}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
