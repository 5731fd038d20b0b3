"""Pruning the reference MoE for translation: 25/50/75% of experts removed, calibrated on translation or
on general text, with the REAP and frequency criteria, scored on the catalog-level test split
(whole gettext catalogs the model never saw in training).

One observation of the calibration split (translation and general texts); every variant is a copy of
the model with a plan applied in memory. Translation is greedy on the first ``--per-pair`` sentences
per language pair (0: the whole split); each variant's chrF carries its n and a paired-bootstrap 95%
interval of its difference to the unpruned model on the same sentences (``evaluate(..., baseline=)``).
A second table gives translation- minus general-calibrated chrF at each criterion and ratio, paired on
the same sentences.

    python bench/bench_reference_pruning.py [--model models/reference] [--data data] [--per-pair 100]
        [--split catalog_test] [--ratios 0.25,0.5,0.75] [--out runs/bench_reference_pruning.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from figures import difference_text  # noqa: E402
from moe_slim.api import plan_for  # noqa: E402
from moe_slim.evals.run import evaluate  # noqa: E402
from moe_slim.evals.translation import compare_results  # noqa: E402
from moe_slim.experts.observe import observe  # noqa: E402
from moe_slim.experts.prune import apply_plan  # noqa: E402
from moe_slim.modeling.loading import load_model  # noqa: E402
from moe_slim.reference.card import calibration_texts  # noqa: E402

CALIBRATIONS = ("translation", "general")
CRITERIA = ("reap", "frequency")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "reference"))
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--split", default="catalog_test")
    ap.add_argument("--per-pair", type=int, default=100, help="sentences per language pair (0: the whole split)")
    ap.add_argument("--calib-per-domain", type=int, default=128)
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_reference_pruning.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file():
        print(f"bench_reference_pruning: no model at {args.model}; skipped")
        return 0
    ratios = [float(r) for r in args.ratios.split(",")]
    limit = args.per_pair or None
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)
    texts = calibration_texts(args.data, args.calib_per_domain)
    with torch.no_grad():
        stats = observe(model, tok, {d: texts[d] for d in CALIBRATIONS}, seq_len=256, batch_size=8)
    base = evaluate(model, tok, "quick", tasks=["translation"], data_dir=args.data, limit=limit, split=args.split)
    rows = [{"calibration": "-", "criterion": "unpruned", "ratio": 0.0, **_scores(base)}]
    results = {}
    print(f"unpruned: chrF {rows[0]['chrf']:.2f} (n {rows[0]['n']}) [{time.perf_counter() - t0:.0f}s]", flush=True)
    for calib in CALIBRATIONS:
        for crit in CRITERIA:
            for ratio in ratios:
                pruned = copy.deepcopy(model)
                apply_plan(pruned, plan_for(pruned, stats, criterion=crit, ratio=ratio, mix={calib: 1.0}))
                res = evaluate(pruned, tok, "quick", tasks=["translation"], data_dir=args.data, limit=limit,
                               split=args.split, baseline=base)
                rows.append({"calibration": calib, "criterion": crit, "ratio": ratio, **_scores(res)})
                results[calib, crit, ratio] = res
                r = rows[-1]
                print(f"{calib:11s} {crit:9s} {ratio:.2f}: chrF {r['chrf']:.2f} (n {r['n']}), Δ {r['delta']:+.2f} "
                      f"({r['delta_ci95'][0]:+.2f} … {r['delta_ci95'][1]:+.2f}) [{time.perf_counter() - t0:.0f}s]",
                      flush=True)
                del pruned
    print("\n" + table(rows, args.split))
    contrasts = calibration_contrasts(results, args.data, args.split)
    print("\n" + contrast_table(contrasts, args.split))
    out = {"model": str(args.model), "split": args.split, "per_pair": args.per_pair, "rows": rows,
           "translation_minus_general": contrasts,
           "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} in {out['seconds']:.0f}s")
    return 0


def _scores(res: dict) -> dict:
    tr = res["tasks"]["translation"]
    out = {"n": tr["overall"]["n"], "chrf": round(tr["overall"]["chrf"], 2),
           "pairs": {p: round(e["chrf"], 2) for p, e in tr["pairs"].items()}}
    if "baseline" in tr:
        c = tr["baseline"]["overall"]["chrf"]
        out.update(delta=round(c["delta"], 2), delta_ci95=[round(x, 2) for x in c["delta_ci95"]],
                   p_value=c["p_value"])
    return out


def calibration_contrasts(results: dict, data: str, split: str) -> list[dict]:
    """Translation- minus general-calibrated chrF at the same criterion and ratio, paired bootstrap on the same
    sentences: the difference calibration makes, measured directly rather than read off two intervals."""
    out = []
    for (calib, crit, ratio), res in results.items():
        if calib != "translation" or ("general", crit, ratio) not in results:
            continue
        cmp = compare_results(res, results["general", crit, ratio], data, split)
        c = cmp["overall"]["chrf"]
        out.append({"criterion": crit, "ratio": ratio, "n": cmp["n"], "delta": round(c["delta"], 2),
                    "delta_ci95": [round(x, 2) for x in c["delta_ci95"]], "p_value": c["p_value"]})
    return out


def contrast_table(contrasts: list[dict], split: str) -> str:
    lines = [f"| criterion | experts removed | n | chrF translation − general calibration ({split}, 95% CI) |",
             "|---|---|---|---|"]
    lines += [f"| {c['criterion']} | {int(c['ratio'] * 100)}% | {c['n']} | {difference_text(c['delta'], c['delta_ci95'])} |"
              for c in contrasts]
    return "\n".join(lines)


def table(rows: list[dict], split: str) -> str:
    """The markdown table of the README: chrF per variant, n, and the difference to the unpruned model."""
    lines = [f"| calibrated on | criterion | experts removed | chrF ({split}) | n | Δ vs unpruned (95% CI) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = difference_text(r["delta"], r["delta_ci95"]) if "delta" in r else "—"
        lines.append(f"| {r['calibration']} | {r['criterion']} | {int(r['ratio'] * 100)}% | {r['chrf']:.2f} | "
                     f"{r['n']} | {d} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
