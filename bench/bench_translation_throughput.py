"""Batched translation evaluation vs a plain one-sentence-at-a-time ``model.generate`` loop.

Same model, same sentences, greedy decoding, same stop rule (``<|end|>``, newline, any ``<|`` tag,
EOS) and token budgets. The outputs must be identical; the speed ratio is printed last (target: at
least 5x). The model is ``models/reference/`` when it exists, else a ~10M-parameter random
Qwen3-MoE with the offline fixture tokenizer from ``tests/eval_fixtures.py``.

    python bench/bench_translation_throughput.py [--sentences 64] [--threads 1] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from moe_slim.evals.generation import eos_token_ids, pad_token_id
from moe_slim.evals.translation import (
    TRANSLATION_STOPS,
    evaluate_translation,
    score_translations,
)
from moe_slim.prompts import cut_generation, translation_prompt


def build_model():
    ref = ROOT / "models" / "reference"
    if (ref / "config.json").is_file():
        from moe_slim.modeling.loading import load_model

        model, tokenizer = load_model(ref, dtype=torch.float32)
        return model, tokenizer, f"reference model ({ref})"
    from eval_fixtures import tiny_moe, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_moe(tokenizer, hidden_size=256, num_hidden_layers=6, num_experts=8, moe_intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)
    return model, tokenizer, "random Qwen3-MoE"


def load_sentences(n: int) -> list[dict]:
    data = ROOT / "data" / "translation" / "test.jsonl"
    if data.is_file():
        from moe_slim.evals.data import read_jsonl
        from moe_slim.evals.translation import pair_name

        records = read_jsonl(data)
        by_pair: dict[str, list[dict]] = {}
        for r in records:
            by_pair.setdefault(pair_name(r), []).append(r)
        out: list[dict] = []
        while len(out) < n and any(by_pair.values()):  # round-robin over pairs
            for recs in by_pair.values():
                if recs and len(out) < n:
                    out.append(recs.pop(0))
        return out
    from eval_fixtures import fixture_records

    return fixture_records(n // 3 + 1)["translation"][:n]


def one_at_a_time(model, tokenizer, records, budgets):
    eos = sorted(eos_token_ids(model, tokenizer))
    pad = pad_token_id(model, tokenizer)
    hyps = []
    for rec, budget in zip(records, budgets):
        prompt = rec.get("prompt") or translation_prompt(rec["src"], rec["tgt_lang"])
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=budget, do_sample=False, num_beams=1, eos_token_id=eos,
                                 pad_token_id=pad, stop_strings=list(TRANSLATION_STOPS), tokenizer=tokenizer)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        kept = []
        for tok in new:
            if tok in eos:
                break
            kept.append(tok)
        hyps.append(cut_generation(tokenizer.decode(kept, skip_special_tokens=False)))
    return hyps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared CPU more threads make both timings erratic; "
                         "0 keeps torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, what = build_model()
    records = load_sentences(args.sentences)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {what}, {n_params / 1e6:.1f}M parameters; {len(records)} sentences; "
          f"torch threads: {torch.get_num_threads()}")
    prompts = [r.get("prompt") or translation_prompt(r["src"], r["tgt_lang"]) for r in records]
    budgets = [min(256, 2 * len(ids) + 16) for ids in tokenizer(prompts)["input_ids"]]

    one_at_a_time(model, tokenizer, records[:2], [4, 4])  # warm-up of both paths
    evaluate_translation(model, tokenizer, records[:2], batch_size=args.batch_size, max_new_tokens=4)

    t0 = time.perf_counter()
    batched = evaluate_translation(model, tokenizer, records, batch_size=args.batch_size)
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    single_hyps = one_at_a_time(model, tokenizer, records, budgets)
    score_translations(single_hyps, [r["ref"] for r in records], [h["pair"] for h in batched["hypotheses"]],
                       sources=[r["src"] for r in records])
    t_single = time.perf_counter() - t0

    batched_hyps = [h["hyp"] for h in batched["hypotheses"]]
    mismatches = [i for i, (a, b) in enumerate(zip(batched_hyps, single_hyps)) if a != b]
    if mismatches:
        i = mismatches[0]
        print(f"FAIL: {len(mismatches)} of {len(records)} outputs differ; first #{i}:\n"
              f"  batched: {batched_hyps[i]!r}\n  single:  {single_hyps[i]!r}")
        return 1
    n_tokens = sum(len(tokenizer(h)["input_ids"]) for h in batched_hyps)
    print(f"identical outputs: {len(records)} of {len(records)} ({n_tokens} hypothesis tokens in all)")
    print(f"one at a time (model.generate): {t_single:.2f} s   batched (batch {args.batch_size}): {t_batched:.2f} s")
    print(f"speedup: {t_single / t_batched:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
