"""ProbScale in its paper's setting: task-specific slimming of fine-tuned models, every baseline at equal size.

For each task (built from the project's data; probes and fine-tuning on the ``train`` split, scores on the
``test`` split, nothing chosen on test items) and each budget (fewer transformer-layer parameters, e.g.
``x2,x3,x6``): probe every layer of the pretrained model on the training texts (5-fold cross-validated
logistic regression), take ProbScale's plan and every baseline at exactly its parameter count (Block
Influence, angular distance, first-n, last-n, evenly spaced, random under three seeds), fine-tune each
slimmed model and the full model with one recipe (transformers' sequence classifier; the same steps,
batches, seed, learning rates and trainable parts for every plan), and report accuracy retention
(slim / full) with 95% paired bootstrap intervals over the test items; intervals holding 0 are ties.
Plans that keep the same layers are fine-tuned once. Results are appended to ``OUT/results.json`` as
they come (a rerun resumes); ``--report`` writes the markdown report from one or more results files.

The defaults are the settings of the report's default recipe; catalogid and pairmatch-hard have longer
recipes (chosen on the validation split, full model only). The runs of docs/bench_probscale/tasks.md:

    python bench/bench_probscale_tasks.py --model minilm --tasks domainid,langid,codeprose,genre --out R/minilm_a40
    python bench/bench_probscale_tasks.py --model minilm --tasks catalogid --steps 200 --batch-size 16 --lr 1e-4 \
        --head-lr 1e-3 --train-per-class 400 --out R/minilm_catalogid
    python bench/bench_probscale_tasks.py --model minilm --tasks pairmatch-hard --steps 300 --batch-size 16 --lr 1e-4 \
        --head-lr 1e-3 --max-length 96 --train-per-class 400 --out R/minilm_pairmatch-hard
    python bench/bench_probscale_tasks.py --model smollm2 --tasks langid,domainid,genre,catalogid --budgets x10,x5 \
        --train-layers 1 --train-per-class 100 --test-per-class 50 --lr 1e-4 --head-lr 1e-3 --out R/smollm2
    python bench/bench_probscale_tasks.py --model smollm2 --tasks catalogid --budgets x10,x5 --train-layers 1 \
        --train-per-class 400 --test-per-class 100 --steps 200 --batch-size 16 --lr 3e-4 --head-lr 3e-3 --out R/smollm2_catalogid
    python bench/bench_probscale_tasks.py --user-path --model minilm --tasks genre --budgets x5 --out R/user_minilm
    python bench/bench_probscale_tasks.py --report R/minilm_a40 R/minilm_catalogid R/minilm_pairmatch-hard R/smollm2 \
        R/smollm2_catalogid

Every run also probes the token the classifier reads (``--probe-pooling mean,readout``); its plans are the
extra methods ``probscale-readout`` and ``probscale-readout-free``.
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
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_probscale import find_models  # noqa: E402
from moe_slim.dense import load_dense  # noqa: E402
from moe_slim.dense.classify import FinetuneConfig  # noqa: E402
from moe_slim.dense.taskslim import finetune_and_score, plans_for_task, probe_summary, probe_task  # noqa: E402
from moe_slim.dense.tasks import builtin_task  # noqa: E402

MODELS = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}
TASKS = ("domainid", "langid", "codeprose", "genre", "catalogid", "pairmatch-hard", "mathanswer")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _key(keep: dict | None) -> str:
    return "full" if keep is None else json.dumps(keep, sort_keys=True)


def _model_and_out(args: argparse.Namespace) -> tuple[str, str, Path] | None:
    """The model's name and path (None, logged, when it is not installed) and the output folder, made."""
    name = MODELS[args.model]
    path, why = find_models()[name]
    if path is None:
        log(f"{name}: skipped ({why})")
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return name, path, out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if "mean" not in args.probe_pooling.split(","):
        raise SystemExit("--probe-pooling must include mean (ProbScale's own plan)")
    found = _model_and_out(args)
    if found is None:
        return
    name, path, out = found
    rfile = out / "results.json"
    res = json.loads(rfile.read_text()) if rfile.exists() else {"model": name, "tasks": {}}
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                         max_length=args.max_length, train_layers=args.train_layers, seed=args.seed)
    res.update({"model": name, "finetune": cfg.to_json(), "train_per_class": args.train_per_class,
                "test_per_class": args.test_per_class, "threads": args.threads})
    model, tok = load_dense(path)
    emb = sum(p.numel() for p in model.get_input_embeddings().parameters())
    res["embedding_params"] = emb
    for tname in args.tasks.split(","):
        train = builtin_task(tname, args.data, split="train", per_class=args.train_per_class, seed=args.seed)
        test = builtin_task(tname, args.data, split="test", per_class=args.test_per_class, seed=args.seed + 1)
        overlap = len(set(train.texts) & set(test.texts))
        entry = res["tasks"].setdefault(tname, {"runs": {}, "budgets": {}})
        entry.update({"train": train.counts(), "test": test.counts(), "train_test_overlap": overlap})
        from moe_slim.dense.probes import ProbeMatrix

        pms: dict[str, ProbeMatrix] = {}
        for pooling in args.probe_pooling.split(","):
            suffix = "" if pooling == "mean" else f"_{pooling}"
            if f"probe{suffix}" not in entry:
                t0 = time.time()
                pm = probe_task(model, tok, train, max_length=args.max_length, seed=args.seed, truncation=cfg.truncation,
                                pooling=pooling)
                entry[f"probe{suffix}"] = {**probe_summary(pm), "pooling": pooling, "seconds": round(time.time() - t0, 1)}
                entry[f"_pm{suffix}"] = pm.to_json()
                p = entry[f"probe{suffix}"]
                log(f"{tname}: {pooling} probe accuracy per layer {p['accuracy']} ({p['seconds']}s); "
                    f"significant gains on {p['significant_gains']} layers")
            pms[pooling] = ProbeMatrix.from_json(entry[f"_pm{suffix}"])
        todo: list[tuple[str, dict | None]] = [("full", None)]
        for b in args.budgets.split(","):
            sels = plans_for_task(model, pms["mean"], b)
            for pooling, pm in pms.items():  # ProbScale on other probe poolings, as extra methods
                if pooling != "mean":
                    other = plans_for_task(model, pm, b)
                    sels[f"probscale-{pooling}"] = other["probscale-contiguous"]
                    sels[f"probscale-{pooling}-free"] = other["probscale-free"]
            entry["budgets"][b] = {m: {**s.to_json(), "key": _key(s.keep)} for m, s in sels.items()}
            log(f"{tname} {b}: " + "; ".join(f"{m} {s.keep}" for m, s in sels.items()))
            todo += [(m, s.keep) for m, s in sels.items()]
        for label, keep in todo:
            k = _key(keep)
            if k in entry["runs"]:
                continue
            r = finetune_and_score(model, tok, keep, train, test, cfg)
            r["load_avg"] = round(os.getloadavg()[0], 2)  # the machine's load while it ran (1-minute average)
            entry["runs"][k] = r
            log(f"{tname}: {label} keep {keep} -> accuracy {r['accuracy']:.3f} (n={r['n']}, {r['seconds']}s)")
            rfile.write_text(json.dumps(res, default=str))
        rfile.write_text(json.dumps(res, default=str))
    log(f"wrote {rfile}")


def user_path(args: argparse.Namespace) -> None:
    """Time the user command, ``moe-slim slim-dense MODEL --task FILE --budget B``, in a subprocess (peak RSS)."""
    from memory_common import run_with_output

    found = _model_and_out(args)
    if found is None:
        return
    name, path, out = found
    task = builtin_task(args.tasks.split(",")[0], args.data, split="train", per_class=args.train_per_class,
                        seed=args.seed)
    f = out / f"{task.name}.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(task.texts, task.labels)))
    cmd = ["nice", "-n", "10", sys.executable, "-m", "moe_slim", "slim-dense", path, "--task", str(f), "--budget",
           args.budgets.split(",")[0], "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
           str(args.max_length), "--lr", str(args.lr), "--out", str(out / "clf"), "--overwrite"]
    if args.train_layers is not None:
        cmd += ["--train-layers", str(args.train_layers)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    load = os.getloadavg()[0]
    m = run_with_output(cmd)
    (out / "user_path.log").write_text(m.stderr + "\n" + m.stdout)
    info = json.loads((out / "clf" / "slim.json").read_text())
    r = info["retention"]
    log(f"user path on {name}, task {task.name} ({len(task.texts)} texts, 20% held out), {' '.join(cmd[3:])}: "
        f"{m.wall:.0f} s wall, {m.cpu:.0f} s CPU, peak RSS {m.rss:.0f} MB (load average before it: {load:.1f}); "
        f"retention {r['retention']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']})")
    (out / "user_path.json").write_text(json.dumps({"model": name, "cmd": cmd[3:], "wall_s": m.wall, "cpu_s": m.cpu,
                                                    "peak_rss_mb": m.rss, "load_before": load, "retention": r,
                                                    "keep": info["keep"]}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--budgets", default="x6,x3,x2")
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--out", default="runs/bench_probscale_tasks/minilm")
    ap.add_argument("--train-per-class", type=int, default=150)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--train-layers", type=int, default=None, help="top kept layers that train (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-pooling", default="mean,readout",
                    help="probe poolings, comma list: mean (ProbScale's plan) and readout (the classifier's token; "
                         "its plans are reported as extra methods)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--user-path", action="store_true",
                    help="time the user command on the first task and budget instead (subprocess, peak RSS)")
    ap.add_argument("--report", nargs="+", help="write the report from these output folders instead of running")
    ap.add_argument("--write", help="with --report: the markdown file to write")
    args = ap.parse_args()
    if args.report:
        from probscale_tasks_report import write_report

        text = write_report([Path(p) / "results.json" for p in args.report])
        if args.write:
            Path(args.write).write_text(text)
        print(text)
        return
    user_path(args) if args.user_path else run(args)


if __name__ == "__main__":
    main()
