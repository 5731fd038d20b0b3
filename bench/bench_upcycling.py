"""Sparse upcycling against training from scratch: two reference-MoE checkpoints of the same shape,
trained on the same tokens, compared on the same items.

``--a`` (default ``runs/v4_upcycled``, a run of ``moe-slim train-reference --dense-steps 1000 --steps
3000``: the recipe v4 first shipped) and ``--b`` (default: the shipped ``models/reference``, trained from
scratch by the recipe's defaults). Prints, for the split given (default
``catalog_test``: whole gettext catalogs never seen in training):

* translation chrF per pair for both, and B − A with a 95% paired bootstrap (same sentences);
* MC accuracy per task for both (lm-eval, per item), and B − A with a 95% paired bootstrap;
* perplexity per domain for both (the same windows);
* expert specialisation per layer (experts taking >= 50% of their load from one domain);
* training time and tokens of each, from ``training.json``.

The ratio printed last: layers with a quarter of the experts specialised, B ÷ A.

    python bench/bench_upcycling.py [--a runs/v4_upcycled] [--b models/reference] [--split catalog_test] [--per-pair N] [--threads 2]
"""

from __future__ import annotations

import argparse
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

from figures import difference_text  # noqa: E402
from moe_slim.dense.measure import paired_difference  # noqa: E402
from moe_slim.evals.mc import run_mc  # noqa: E402
from moe_slim.evals.mc_items import MC_TASKS  # noqa: E402
from moe_slim.evals.perplexity import windows_nll, windows_of  # noqa: E402
from moe_slim.evals.translation import evaluate_translation, select_records  # noqa: E402
from moe_slim.experts.observe import observe  # noqa: E402
from moe_slim.modeling.loading import load_model  # noqa: E402
from moe_slim.reference.card import calibration_texts, specialisation  # noqa: E402
from moe_slim.reference.recipe import DOMAINS  # noqa: E402


def _ppl(model, tok, data: Path, split: str, docs: int, seq_len: int = 256) -> dict[str, dict]:
    out = {}
    for d in DOMAINS:
        f = data / d / f"{split}.jsonl"
        f = f if f.is_file() else data / d / "test.jsonl"
        texts = [json.loads(line)["text"] for line in f.open(encoding="utf-8")][:docs]
        ids = tok([t for t in texts if t.strip()])["input_ids"]
        windows = [w for x in ids for w in windows_of(x, seq_len)]
        nll, n = windows_nll(model, windows, batch_size=8, pad_id=tok.pad_token_id or 0)
        out[d] = {"ppl": float(torch.tensor(nll / n).exp()), "tokens": n, "docs": len(texts)}
    return out


def measure(path: str, records: list[dict], args, baseline_hyps: list[str] | None) -> dict:
    t0 = time.time()
    model, tok = load_model(path, dtype=torch.float32)
    tr = evaluate_translation(model, tok, records, baseline=baseline_hyps, seed=args.seed)
    mc = run_mc(model, tok, MC_TASKS, data_dir=args.data, split=args.split, limit=args.mc_limit, per_item=True)
    ppl = _ppl(model, tok, Path(args.data), args.split, args.ppl_docs)
    stats = observe(model, tok, calibration_texts(args.data, 200), seq_len=256, batch_size=8)
    training = json.loads((Path(path) / "training.json").read_text())
    return {"path": path, "translation": tr, "mc": mc, "ppl": ppl, "spec": specialisation(stats),
            "training": {k: training.get(k) for k in ("train_seconds", "tokens_seen", "threads", "phase_seconds")},
            "dense_steps": training.get("recipe", {}).get("dense_steps"), "seconds": time.time() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default=str(ROOT / "runs" / "v4_upcycled"),
                    help="first checkpoint (default: runs/v4_upcycled, the upcycled run)")
    ap.add_argument("--b", default=str(ROOT / "models" / "reference"),
                    help="second checkpoint (default: the shipped one, trained from scratch)")
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--split", default="catalog_test")
    ap.add_argument("--per-pair", type=int, default=None, help="translation sentences per pair (default: all)")
    ap.add_argument("--mc-limit", type=int, default=None, help="MC items per task (default: all)")
    ap.add_argument("--ppl-docs", type=int, default=200, help="documents per domain for perplexity")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_upcycling.json"))
    args = ap.parse_args()
    if not (Path(args.a) / "config.json").exists():
        # make bench runs every script; the upcycled model costs ~40 min of training, so say how to get it
        print(f"bench_upcycling: skipped, no checkpoint at {args.a}; train it with `moe-slim "
              f"train-reference --out {args.a} --dense-steps 1000 --steps 3000` (about 40 min on 2 cores)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    with (Path(args.data) / "translation" / f"{args.split}.jsonl").open(encoding="utf-8") as f:
        records = select_records([json.loads(line) for line in f], args.per_pair)
    a = measure(args.a, records, args, None)
    b = measure(args.b, records, args, [h["hyp"] for h in a["translation"]["hypotheses"]])

    def name(m: dict) -> str:
        return f"{'upcycled' if m['dense_steps'] else 'from scratch'} ({m['path']})"

    print(f"A = {name(a)}\nB = {name(b)}\nsplit {args.split}; B − A with 95% paired bootstrap; 'tie' when it holds 0\n")
    for m in (a, b):
        t = m["training"]
        print(f"{name(m)}: {t['tokens_seen']:,} tokens, {t['train_seconds'] / 60:.1f} min on {t['threads']} threads "
              f"(phases {t['phase_seconds']}); measured in {m['seconds']:.0f}s")
    print("\n| pair | n | chrF A | chrF B | B − A (95% CI) |\n|---|---|---|---|---|")
    for p, e in b["translation"]["baseline"]["pairs"].items():
        d = e["chrf"]
        print(f"| {p} | {a['translation']['pairs'][p]['n']} | {a['translation']['pairs'][p]['chrf']:.2f} | "
              f"{b['translation']['pairs'][p]['chrf']:.2f} | {difference_text(d['delta'], d['delta_ci95'])} |")
    print("\n| MC task | n | acc A | acc B | B − A (95% CI) |\n|---|---|---|---|---|")
    for t in MC_TASKS:
        ia, ib = a["mc"]["items"][t], b["mc"]["items"][t]
        d = paired_difference({t: ib}, {t: ia}, samples=2000, seed=0)
        print(f"| {t} | {len(ia)} | {sum(ia) / len(ia):.3f} | {sum(ib) / len(ib):.3f} | "
              f"{difference_text(d['delta'], d['ci95'], 3)} |")
    print("\n| domain | tokens | ppl A | ppl B |\n|---|---|---|---|")
    for dom in DOMAINS:
        print(f"| {dom} | {a['ppl'][dom]['tokens']} | {a['ppl'][dom]['ppl']:.2f} | {b['ppl'][dom]['ppl']:.2f} |")
    print("\n| layer | A: experts >= 50% one domain | B: experts >= 50% one domain |\n|---|---|---|")
    for la, lb in zip(a["spec"]["layers"], b["spec"]["layers"]):
        print(f"| `{la['layer']}` | {la['experts_over_50pct']} | {lb['experts_over_50pct']} |")
    qa, qb = a["spec"]["layers_with_quarter_specialised"], b["spec"]["layers_with_quarter_specialised"]
    n_layers = len(a["spec"]["layers"])
    print(f"\nlayers with >= a quarter of the experts specialised: A {qa} of {n_layers}, B {qb} of {n_layers}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"a": a, "b": b}, default=str))
    print(f"ratio (specialised layers B ÷ A): {qb / max(qa, 1):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
