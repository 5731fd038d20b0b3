"""Expert merging vs REAP pruning: quality, time and peak memory at 25% and 50% of experts removed.

Every method (ream; ream with groups of at most C=2 experts, since the default C=16 is sized for
128 experts; ream with sequential merging; hc-smoe; m-smoe; average) and REAP pruning starts
from the same model and the same calibration statistics (one ``observe`` with token samples). Each
variant is scored with the quick evaluation suite (``moe_slim.evaluate``) and, because task scores
of small models are noisy, also by its fidelity to the uncompressed model on held-out text: the
mean per-token KL(original || variant) and top-1 agreement. Time and peak memory cover the
compression step only (peak RSS above the start, sampled every 2 ms, plus the process's maxrss).

The model is ``models/reference/`` when it exists; otherwise a small Qwen3-MoE (16 experts, top-2)
with the offline fixture tokenizer, trained here for ``--train-steps`` on fixture text (random
experts carry no structure for merging to keep) on ``data/``'s train split. Data: ``data/`` when it has
test splits, else fixture data in a temporary directory.

    python bench/bench_merge.py [--ratios 0.25,0.5] [--methods ream,ream-seq,...] [--train-steps 300]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import scipy.cluster.hierarchy  # noqa: E402,F401  (imported up front: no method pays for it)
import scipy.optimize  # noqa: E402,F401
import torch  # noqa: E402

from moe_slim.api import plan_for
from moe_slim.evals.run import evaluate
from moe_slim.experts.batches import make_batches
from moe_slim.experts.merge.driver import merge_model
from moe_slim.experts.observe import observe
from moe_slim.experts.prune import apply_plan, count_parameters
from moe_slim.families import moe_layers

DOMAINS = ("general", "math", "code", "translation")
VARIANTS = ("reap-prune", "ream", "ream-c2", "ream-seq", "hc-smoe", "m-smoe", "average")


class PeakRSS:
    """Peak resident memory above the level at start, sampled by a thread (torch's allocator is invisible
    to tracemalloc)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def load_texts(data_dir: Path, split: str) -> dict[str, list[str]]:
    from moe_slim.evals.data import read_jsonl

    return {d: [str(r["text"]) for r in read_jsonl(data_dir / d / f"{split}.jsonl")] for d in DOMAINS
            if (data_dir / d / f"{split}.jsonl").is_file()}


def build(train_steps: int, seed: int) -> tuple[torch.nn.Module, object, str, Path, dict[str, list[str]]]:
    """(model, tokenizer, description, data dir, calibration texts)."""
    ref = ROOT / "models" / "reference"
    data = ROOT / "data"
    have_data = all((data / d / "test.jsonl").is_file() for d in DOMAINS)
    if not have_data:
        from eval_fixtures import write_fixture_data

        data = write_fixture_data(Path(tempfile.mkdtemp(prefix="bench_merge_data_")), n_per_domain=60)
    if (ref / "config.json").is_file():
        from moe_slim.modeling.loading import load_model

        model, tok = load_model(ref, dtype=torch.float32)
        desc = f"reference model ({ref})"
    else:
        from eval_fixtures import tiny_moe, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_moe(tok, seed=seed, hidden_size=128, num_hidden_layers=4, num_experts=16,
                         moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         intermediate_size=256)
        desc = "small Qwen3-MoE (16 experts, top-2, random init"
        if train_steps:
            train_texts = load_texts(data, "train") if have_data else {}
            train(model, tok, train_steps, seed, [t for texts in train_texts.values() for t in texts[:2000]])
            desc += f", trained {train_steps} steps on {'data/ train' if train_texts else 'fixture'} text)"
        else:
            desc += ", untrained)"
    calib = load_texts(data, "calibration") if have_data else {}
    if not calib:
        from eval_fixtures import fixture_records

        calib = {d: [r["text"] for r in recs] for d, recs in fixture_records(60, seed=11).items()}
    return model.eval(), tok, desc, data, calib


def train(model: torch.nn.Module, tok: object, steps: int, seed: int, texts: list[str] | None = None) -> None:
    from eval_fixtures import fixture_records

    if not texts:
        texts = [r["text"] for recs in fixture_records(200, seed=7).values() for r in recs]
    batches = make_batches(tok, texts, seq_len=128, batch_size=8, max_tokens=None, pack=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        b = batches[int(torch.randint(len(batches), (1,), generator=g))]
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.input_ids.masked_fill(
            b.attention_mask == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def fidelity(ref_logits: list[torch.Tensor], model: torch.nn.Module, batches: list) -> tuple[float, float]:
    """Mean per-token KL(original || model) and top-1 agreement on the held-out batches."""
    kl_sum = agree = n = 0.0
    for ref, b in zip(ref_logits, batches):
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
        mask = b.attention_mask.bool()
        p, q = ref.log_softmax(-1)[mask], out.log_softmax(-1)[mask]
        kl_sum += float((p.exp() * (p - q)).sum())
        agree += float((p.argmax(-1) == q.argmax(-1)).sum())
        n += float(mask.sum())
    return kl_sum / n, agree / n


def compress(variant: str, base: torch.nn.Module, stats, ratio: float, calib, tok, args) -> tuple[torch.nn.Module, float, float]:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if variant == "reap-prune":
            apply_plan(model, plan_for(model, stats, criterion="reap", ratio=ratio))
        elif variant == "ream-c2":  # REAM with groups of at most 2: C=16 is sized for 128 experts
            merge_model(model, stats, "ream", ratio, max_tokens=args.samples * len(calib), group_size=2)
        elif variant == "ream-seq":
            merge_model(model, stats, "ream", ratio, sequential=True, calibration=calib, tokenizer=tok,
                        seq_len=args.seq_len, max_tokens=args.samples * len(calib), group_size=args.group_size)
        else:
            merge_model(model, stats, variant, ratio, max_tokens=args.samples * len(calib), group_size=args.group_size)
    return model, time.perf_counter() - t0, mem.extra_mb


def summarise(result: dict) -> dict[str, float]:
    m = result["metrics"]
    mc = [m[k] for k in ("translation_choice/acc", "math_choice/acc", "code_next_line/acc", "general_cloze/acc")
          if k in m]
    return {"ppl": m.get("perplexity/ppl", float("nan")), "chrf": m.get("translation/chrf", float("nan")),
            "mc": sum(mc) / len(mc) if mc else float("nan"), "math": m.get("math_gen/exact_match", float("nan"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--train-steps", type=int, default=300, help="training of the fallback model (0: random)")
    ap.add_argument("--samples", type=int, default=8192, help="sample tokens per domain and layer")
    ap.add_argument("--calib-tokens", type=int, default=16000, help="calibration tokens observed per domain")
    ap.add_argument("--group-size", type=int, default=16, help="REAM's C")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="items per eval task (default: the quick suite's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on shared CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    base, tok, desc, data, calib = build(args.train_steps, args.seed)
    layers = moe_layers(base)
    print(f"model: {desc}; {count_parameters(base) / 1e6:.2f}M parameters, {len(layers)} MoE layers x "
          f"{layers[0].num_experts} experts; built in {time.perf_counter() - t0:.0f}s; data: {data}; "
          f"torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    stats = observe(base, tok, calib, seq_len=args.seq_len, batch_size=8, samples=args.samples,
                    max_tokens=args.calib_tokens)
    print(f"observe with samples: {time.perf_counter() - t0:.1f}s; calibration tokens "
          f"{ {d: int(v) for d, v in stats.meta['tokens_per_domain'].items()} }")
    from moe_slim.evals.data import read_jsonl

    held = [str(r["text"]) for d in DOMAINS for r in read_jsonl(data / d / "test.jsonl")[:30]]
    held_batches = make_batches(tok, held, seq_len=128, batch_size=8, max_tokens=None, pack=False)
    with torch.no_grad():
        ref_logits = [base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
                      for b in held_batches]

    rows = []
    res = summarise(evaluate(base, tok, "quick", data_dir=data, limit=args.limit))
    rows.append(("original", 0.0, layers[0].num_experts, count_parameters(base), 0.0, 0.0, res, 0.0, 1.0))
    for ratio in ratios:
        for v in variants:
            model, secs, mb = compress(v, base, stats, ratio, calib, tok, args)
            kl, agree = fidelity(ref_logits, model, held_batches)
            res = summarise(evaluate(model, tok, "quick", data_dir=data, limit=args.limit))
            rows.append((v, ratio, moe_layers(model)[0].num_experts, count_parameters(model), secs, mb, res, kl, agree))
            print(f"  {v:10s} ratio {ratio:.2f}: {secs:6.2f}s, +{mb:6.1f} MB, KL {kl:.4f}, top-1 {agree:.3f}, "
                  f"ppl {res['ppl']:.2f}", flush=True)
            del model

    print()
    print("| variant | removed | experts | params | time s | peak +MB | ppl | chrF | MC acc | math EM | KL to orig | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v, ratio, e, params, secs, mb, r, kl, agree in rows:
        print(f"| {v} | {ratio:.0%} | {e} | {params / 1e6:.2f}M | {secs:.2f} | {mb:.1f} | {r['ppl']:.2f} | "
              f"{r['chrf']:.2f} | {r['mc']:.3f} | {r['math']:.3f} | {kl:.4f} | {agree:.3f} |")
    for ratio in ratios:
        cand = [r for r in rows if r[1] == ratio]
        best_kl = min(cand, key=lambda r: r[7])
        best_ppl = min(cand, key=lambda r: r[6]["ppl"])
        print(f"ratio {ratio:.0%}: closest to the original (KL): {best_kl[0]}; lowest perplexity: {best_ppl[0]}")
    print(f"process maxrss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
