"""Does recovery heal heavy expert pruning? REAP pruning for translation, then CE-SFT, distillation from the
unpruned model (KD, KD+CE), router-only KD and LoRA-KD, each on the same data budget.

On the reference MoE (``models/reference/``): observe the calibration split of every domain, plan with REAP
on the translation mix, prune each ``--ratios`` share of the experts (75% first), then heal a copy of each
pruned model with every method in ``--methods`` for at most ``--steps`` optimizer steps of ``--batch-size``
sequences from the same mix and seed (the same batches for every method). Early stopping watches each
method's own objective on the ``validation`` split; the test splits are scored once, after training.

Scores, each with its n:

* chrF on the whole catalog-level test split (``catalog_test``: gettext catalogs never seen in training),
  with the paired-bootstrap 95% interval of the difference to the unpruned model and to CE-SFT (same
  sentences);
* MC accuracy per task (the first ``--mc-limit`` items of each; lm-eval, zero-shot), with a paired
  bootstrap over items;
* perplexity per domain (the first ``--ppl-docs`` test documents), with a paired bootstrap over documents.

Target: chrF after recovery at 75% removed >= the unpruned model's, met only when the interval of the
difference lies at or above 0. Rows are written to ``--json`` after every model, so a run cut short keeps
what finished.

Learning rate per ratio, chosen without the test split: with ``--lr-probe 3e-4,1e-3,3e-3,1e-2`` each
ratio first runs CE-SFT (``experts`` mode) for ``--probe-steps`` steps at every rate of the grid on the same
batches, and the rate with the lowest validation loss at the probe's end wins; every method's rate is then
the table's rate times (winner / CE's table rate), so router and LoRA keep their ratio to the experts rate.
``--base-cache FILE`` keeps the observed statistics and the unpruned scores (pickle), so runs split by ratio
over several processes score the unpruned model once. ``--table A.json B.json ...`` prints the merged tables
of finished runs (same unpruned model) without running anything.

    OMP_NUM_THREADS=1 python bench/bench_sft_recovery.py [--ratios 0.75,0.5,0.875] [--methods ce,kd,kd+ce,router-kd,lora-kd]
        [--steps 300] [--mc-limit 300] [--ppl-docs 100] [--json runs/bench_sft_recovery.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from figures import difference_text  # noqa: E402
from moe_slim.api import plan_for  # noqa: E402
from moe_slim.evals.data import data_file, read_jsonl, split_for  # noqa: E402
from moe_slim.evals.generation import pad_token_id  # noqa: E402
from moe_slim.evals.mc import run_mc  # noqa: E402
from moe_slim.evals.mc_items import MC_TASKS  # noqa: E402
from moe_slim.evals.perplexity import windows_nll, windows_of  # noqa: E402
from moe_slim.evals.run import evaluate  # noqa: E402
from moe_slim.evals.translation import compare_results  # noqa: E402
from moe_slim.experts.observe import observe  # noqa: E402
from moe_slim.experts.prune import apply_plan  # noqa: E402
from moe_slim.modeling.loading import load_model  # noqa: E402
from moe_slim.recover.loop import sft  # noqa: E402
from moe_slim.reference.card import calibration_texts  # noqa: E402
from moe_slim.reference.recipe import REFERENCE_DIR  # noqa: E402

#: method -> (mode, loss, learning rate, extra sft keywords)
METHODS: dict[str, tuple[str, str, float, dict]] = {
    "ce": ("experts", "ce", 3e-3, {}),
    "kd": ("experts", "kd", 3e-3, {}),
    "kd+ce": ("experts", "kd+ce", 3e-3, {"kd_weight": 0.5}),
    "router-kd": ("router", "kd", 1e-2, {}),
    "lora-kd": ("lora", "kd", 3e-3, {"lora_experts": True, "merge_lora": True}),
}
PPL_DOMAINS = ("translation", "general", "math", "code")
SPLIT = "catalog_test"


def paired_interval(a: np.ndarray, b: np.ndarray, stat, n_samples: int = 1000, seed: int = 12345) -> dict:
    """stat(a) - stat(b) and the percentile 95% interval of a paired bootstrap over the same items."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_samples, len(a)))
    diffs = np.array([stat(a[i]) - stat(b[i]) for i in idx])
    return {"delta": float(stat(a) - stat(b)), "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}


def _acc(x: np.ndarray) -> float:
    return float(x.mean())


def _ppl(x: np.ndarray) -> float:  # rows (nll sum, tokens) per document
    return math.exp(x[:, 0].sum() / max(x[:, 1].sum(), 1))


def perplexity_docs(model, tok, data: str, docs: int, seq_len: int = 512) -> dict[str, np.ndarray]:
    """Per-document (NLL sum, tokens) of the first ``docs`` test documents of each domain."""
    out = {}
    for d in PPL_DOMAINS:
        recs = read_jsonl(data_file(data, d, split_for(d, SPLIT)))[:docs]
        rows = []
        for r in recs:
            ids = tok(str(r.get("text") or ""), add_special_tokens=True)["input_ids"]
            wins = windows_of(ids, seq_len)
            rows.append(windows_nll(model, wins, batch_size=4, pad_id=pad_token_id(model, tok)) if wins else (0.0, 0))
        out[d] = np.array(rows, dtype=np.float64)
    return out


def score(model, tok, args, base: dict | None = None) -> dict:
    """chrF on the whole split (hypotheses kept for pairing), MC items, perplexity documents."""
    model.eval()
    tr = evaluate(model, tok, "full", tasks=["translation"], data_dir=args.data, split=SPLIT, limit=args.per_pair,
                  hash_weights=False, baseline=base["translation"] if base else None)
    mc = run_mc(model, tok, list(MC_TASKS), data_dir=args.data, split=SPLIT, limit=args.mc_limit, per_item=True,
                batch_size=16)
    return {"translation": tr, "mc": {k: np.array(v) for k, v in mc["items"].items()},
            "ppl": perplexity_docs(model, tok, args.data, args.ppl_docs)}


def compare(s: dict, other: dict, args) -> dict:
    """Paired differences of s minus other: chrF, MC accuracy per task, perplexity per domain."""
    c = compare_results(s["translation"], other["translation"], args.data, SPLIT)["overall"]["chrf"]
    out = {"chrf": {"delta": c["delta"], "ci95": list(c["delta_ci95"])}}
    for t, a in s["mc"].items():
        out[f"mc/{t}"] = paired_interval(a, other["mc"][t], _acc)
    for d, a in s["ppl"].items():
        out[f"ppl/{d}"] = paired_interval(a, other["ppl"][d], _ppl)
    return out


def summary(s: dict) -> dict:
    tr = s["translation"]["metrics"]
    out = {"chrf": round(float(tr["translation/chrf"]), 2), "n_chrf": int(tr["translation/n"])}
    for t, a in s["mc"].items():
        out[f"mc/{t}"] = round(_acc(a), 4)
        out[f"n_mc/{t}"] = len(a)
    for d, a in s["ppl"].items():
        out[f"ppl/{d}"] = round(_ppl(a), 3)
        out[f"n_ppl/{d}"] = len(a)
    return out


def rounded(d: dict) -> dict:
    return {k: {"delta": round(v["delta"], 4), "ci95": [round(x, 4) for x in v["ci95"]]} for k, v in d.items()}


def probe_lr(pruned, tok, args, grid: list[float]) -> tuple[float, dict[str, float]]:
    """The CE-SFT learning rate of ``grid`` with the lowest validation loss after ``--probe-steps`` steps."""
    losses = {}
    for lr in grid:
        res = sft(copy.deepcopy(pruned), tok, args.mix, data_dir=args.data, steps=args.probe_steps, mode="experts",
                  loss="ce", lr=lr, batch_size=args.batch_size, eval_every=args.probe_steps, patience=None,
                  seed=args.seed, progress=False)
        losses[f"{lr:g}"] = round(float(res.history[-1]["val_loss"]), 5)
        print(f"  lr probe {lr:g}: validation loss {losses[f'{lr:g}']:.4f} after {args.probe_steps} steps "
              f"(before {res.metrics_before['val_loss']:.4f})", flush=True)
    best = min(grid, key=lambda lr: losses[f"{lr:g}"])
    return best, losses


def unpruned_scores(teacher, tok, args):
    """Observed statistics and unpruned scores, from ``--base-cache`` when it exists (written when not)."""
    cache = Path(args.base_cache) if args.base_cache else None
    if cache is not None and cache.is_file():
        with cache.open("rb") as f:
            return pickle.load(f)
    stats = observe(teacher, tok, calibration_texts(args.data, args.calib_per_domain), seq_len=256)
    base = score(teacher, tok, args)
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump((stats, base), f)
        tmp.replace(cache)
    return stats, base


def merged(paths: list[str]) -> dict:
    """The runs of ``paths`` as one (rows in ratio order); they must share the unpruned model's figures. A ratio
    run again in a later file replaces every row of that ratio from the earlier ones (one pruned model per ratio)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for p, r in zip(paths[1:], runs[1:]):
        if r["unpruned"] != runs[0]["unpruned"]:
            raise SystemExit(f"bench_sft_recovery: {p} scored another unpruned model than {paths[0]}")
    out = dict(runs[0])
    order = {0.75: 0, 0.5: 1, 0.875: 2}
    by_ratio: dict[float, list[dict]] = {}
    for r in runs:
        fresh: dict[float, list[dict]] = {}
        for row in r["rows"]:
            fresh.setdefault(row["ratio"], []).append(row)
        by_ratio.update(fresh)
    out["rows"] = [row for ratio in sorted(by_ratio, key=lambda x: order.get(x, 9)) for row in by_ratio[ratio]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the merged tables of these runs and stop")
    ap.add_argument("--lr-probe", default="", help="comma-separated CE-SFT learning rates probed per ratio")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--base-cache", default=None, help="pickle of the observed statistics and unpruned scores")
    ap.add_argument("--model", default=str(REFERENCE_DIR))
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--ratios", default="0.75,0.5,0.875")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--per-pair", type=int, default=None, help="translation sentences per pair (default: the whole split)")
    ap.add_argument("--mc-limit", type=int, default=300, help="items per MC task")
    ap.add_argument("--ppl-docs", type=int, default=100, help="test documents per domain for perplexity")
    ap.add_argument("--calib-per-domain", type=int, default=300)
    ap.add_argument("--mix", default="translation=0.8,general=0.2", help="data mix of every method")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=6.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_sft_recovery.json"))
    args = ap.parse_args(argv)
    if args.table:
        print(table(merged(args.table)))
        return 0
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not (Path(args.model) / "config.json").is_file():
        print(f"bench_sft_recovery: no model at {args.model} (train it with `moe-slim train-reference`)", file=sys.stderr)
        return 1
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"bench_sft_recovery: unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})",
              file=sys.stderr)
        return 1
    t_start = time.perf_counter()
    teacher, tok = load_model(args.model, dtype=torch.float32)
    teacher.eval()
    stats, base = unpruned_scores(teacher, tok, args)
    out = {"model": str(args.model), "split": SPLIT, "mix": args.mix, "steps": args.steps, "batch_size": args.batch_size,
           "mc_limit": args.mc_limit, "ppl_docs": args.ppl_docs, "threads": args.threads, "unpruned": summary(base),
           "rows": []}
    print(f"unpruned: {out['unpruned']} [{time.perf_counter() - t_start:.0f}s]", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        out["rows"].append(row)
        out["seconds"] = round(time.perf_counter() - t_start, 1)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"{row['ratio']:.3f} {row['method']}: chrF {row['chrf']:.2f} (n {row['n_chrf']}) vs unpruned "
              f"{difference_text(**row['vs_unpruned']['chrf'])} [{out['seconds']:.0f}s]", flush=True)

    for ratio in [float(r) for r in args.ratios.split(",")]:
        pruned = copy.deepcopy(teacher)
        plan = plan_for(pruned, stats, criterion="reap", ratio=ratio, mix={"translation": 1})
        apply_plan(pruned, plan)
        pruned_scores = score(pruned, tok, args, base)
        record({"ratio": ratio, "method": "pruned", **summary(pruned_scores),
                "vs_unpruned": rounded(compare(pruned_scores, base, args))})
        ce_scores, scale = None, 1.0
        if args.lr_probe:
            best, losses = probe_lr(pruned, tok, args, [float(x) for x in args.lr_probe.split(",")])
            scale = best / METHODS["ce"][2]
            out.setdefault("lr_probe", {})[f"{ratio:g}"] = {"steps": args.probe_steps, "val_loss": losses, "chosen": best}
        for method in methods:
            mode, loss, lr, extra = METHODS[method]
            lr = lr * scale
            student = copy.deepcopy(pruned)
            res = sft(student, tok, args.mix, data_dir=args.data, steps=args.steps, mode=mode, loss=loss,
                      teacher=teacher if loss != "ce" else None, lr=lr, batch_size=args.batch_size,
                      eval_every=args.eval_every, patience=args.patience, seed=args.seed, max_minutes=args.max_minutes,
                      progress=sys.stderr.isatty(), **extra)
            s = score(res.model, tok, args, base)
            row = {"ratio": ratio, "method": method, "mode": mode, "loss": loss, "lr": lr, **summary(s),
                   "vs_unpruned": rounded(compare(s, base, args)), "steps": res.steps, "best_step": res.best_step,
                   "tokens": res.tokens, "minutes": round(res.seconds / 60, 2),
                   "trainable_params": res.trainable_params, "val_before": res.metrics_before,
                   "val_after": res.metrics_after}
            if method == "ce":
                ce_scores = s
            elif ce_scores is not None:
                row["vs_ce"] = rounded(compare(s, ce_scores, args))
            record(row)
            del student, res, s
        del pruned
    print()
    print(table(out))
    return 0


def table(out: dict) -> str:
    """The README's tables: chrF per method and ratio with both paired intervals; MC and perplexity per domain."""
    u = out["unpruned"]
    lines = [f"| experts removed | method | chrF ({out['split']}, n={u['n_chrf']}) | − unpruned (95% CI) | − CE-SFT (95% CI) "
             "| lr | steps (best) | min |", "|---|---|---|---|---|---|---|---|",
             f"| 0% | unpruned | {u['chrf']:.2f} | — | — | — | — | — |"]
    for r in out["rows"]:
        vs_ce = difference_text(**r["vs_ce"]["chrf"]) if "vs_ce" in r else "—"
        steps = f"{r['steps']} ({r['best_step']})" if "steps" in r else "—"
        lines.append(f"| {r['ratio']:.1%} | {r['method']} | {r['chrf']:.2f} | {difference_text(**r['vs_unpruned']['chrf'])} "
                     f"| {vs_ce} | {format(r['lr'], 'g') if 'lr' in r else '—'} | {steps} | {r.get('minutes', '—')} |")
    keys = [k for k in u if k.startswith(("mc/", "ppl/"))]
    lines += ["", "| experts removed | method | " + " | ".join(f"{k} (n={u['n_' + k]})" for k in keys) + " |",
              "|---|---|" + "---|" * len(keys),
              "| 0% | unpruned | " + " | ".join(f"{u[k]:.3f}" for k in keys) + " |"]
    for r in out["rows"]:
        cells = []
        for k in keys:
            d = r["vs_unpruned"][k]
            cell = f"{r[k]:.3f}; Δu {difference_text(d['delta'], d['ci95'], 3)}"
            if "vs_ce" in r:
                cell += f"; Δce {difference_text(r['vs_ce'][k]['delta'], r['vs_ce'][k]['ci95'], 3)}"
            cells.append(cell)
        lines.append(f"| {r['ratio']:.1%} | {r['method']} | " + " | ".join(cells) + " |")
    at75 = [r for r in out["rows"] if abs(r["ratio"] - 0.75) < 1e-9 and r["method"] != "pruned"]
    if at75:
        met = [r["method"] for r in at75 if r["vs_unpruned"]["chrf"]["ci95"][0] >= 0]
        lines.append(f"\ntarget (chrF at 75% removed >= unpruned, interval's lower end >= 0): "
                     f"{'met by ' + ', '.join(met) if met else 'NOT met by any method'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
