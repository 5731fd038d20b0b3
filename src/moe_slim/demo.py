"""``make demo``: the built-in sweep on the reference MoE, end to end through the API.

On the shipped reference model (models/reference/): run ``sweeps/demo.yaml`` (observe the four
domains once; prune with REAP and frequency at 25/50/75%, calibrated on general text or on
translation; evaluate each in memory on the catalog-level test split, 30 sentences per pair, 30 MC
items, 30 perplexity documents per domain), print parameters, chrF (with n), MC accuracy and perplexity per configuration and
write the report with the Pareto fronts under runs/demo-sweep/report/. Without the reference model
the demo falls back to a small RANDOMLY INITIALISED Qwen3-MoE and says so: observe -> prune ->
reload -> generate.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from .api import observe_checkpoint, prune_checkpoint
from .experts.criteria import score
from .experts.prune import count_parameters
from .modeling.tiny import save_tiny
from .prompts import translation_prompt

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


DEMO_SPEC = Path(__file__).resolve().parents[2] / "sweeps" / "demo.yaml"
DEMO_SWEEP_DIR = Path("runs/demo-sweep")


def sweep_demo(spec_path: Path = DEMO_SPEC, out: Path = DEMO_SWEEP_DIR, data_dir: str = "data", jobs: int = 1) -> int:
    """The demo on the reference MoE: the built-in sweep (one observation, 12 pruned variants + baseline).

    Resumable: re-running `make demo` evaluates only the points not yet in ``out/results.db``.
    """
    from transformers.utils import logging as hf_logging

    from .reference.recipe import REFERENCE_DIR
    from .sweep.report import pivot, write_report
    from .sweep.run import run_sweep
    from .sweep.spec import load_spec

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    raw_model = yaml.safe_load(spec_path.read_text())["model"]
    model = None
    if raw_model == "models/reference" and not Path(raw_model).exists():  # run from outside the repository root
        model = str(REFERENCE_DIR)
    spec = load_spec(spec_path, data_dir=data_dir, model=model)
    print(f"moe_slim demo: sweep {spec_path} on the reference MoE ({spec.model}): {len(spec.mixes)} calibration "
          f"mixes x {len(spec.methods)} methods x {len(spec.ratios)} ratios + baseline\n")
    t = time.perf_counter()
    summary = run_sweep(spec, out, jobs=jobs)
    rep = write_report(summary["db"], target="chrf>=0.98*baseline")
    from .sweep.store import read_rows

    rows, _ = read_rows(summary["db"])
    print("\nper configuration: parameters, chrF (translation), mean multiple-choice accuracy, perplexity "
          "(quick suite with a small limit):\n")
    print(rep["table"])
    print("\nchrF per method and calibration mix:\n")
    print(pivot(rows, "chrf"))
    best = rep["best"]
    if best is not None:
        print(f"\nfewest experts keeping >= 98% of baseline chrF: {best['method']} at {best['ratio']:g} removed, "
              f"mix {best['mix']} ({best['experts_kept']}/{best['experts_total']} experts, chrF {best['chrf']:.2f})")
        print(f"  write it: {rep['command']}")
    print(f"\n{summary['ran']} points run, {summary['already_done']} reused, in {time.perf_counter() - t:.0f}s")
    print(f"report: {rep['report']} (Pareto fronts: {', '.join(rep['plots'])})")
    return 0


def main(data_dir: str = "data") -> int:
    from .reference.recipe import REFERENCE_DIR

    if (REFERENCE_DIR / "config.json").exists() and DEMO_SPEC.exists():
        return sweep_demo(data_dir=data_dir)
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
    base = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
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
        model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
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
