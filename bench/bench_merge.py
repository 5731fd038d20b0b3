"""Merging, MoNE and pruning on the shipped reference model: fidelity, chrF, time and output size.

At each ratio (share of experts removed) every variant starts from the same model and the same
calibration statistics (one ``observe`` with token samples and output sums):

* ``reap-prune``, ``freq-prune``: REAP / frequency pruning; a ``+super`` suffix on any variant never
  removes or merges a super-expert (:mod:`moe_slim.experts.superexperts`);
* ``mone``: MoNE, the others replaced by their mean output (novices; router rows kept);
* ``ream``: REAM with moe_slim's defaults (C = min(16, E/2); alignment tokens from every domain);
  ``ream-repo``: REAM's repository defaults (preset; sequential);
* ``hc-smoe``: HC-SMoE, the merged expert keeping its most frequent member's router row (``@method``
  suffix: the paper's representative's row; ``@saliency``: the most salient member's);
  ``hc-smoe-tied``: HC-SMoE as the paper (members bound to the merge, router untouched, no shrink);
* ``m-smoe``, ``average``.

Scores: KL(original || variant) per token and top-1 agreement on held-out text (all four domains),
with a paired bootstrap over texts of the KL difference to REAP pruning at the same ratio; chrF on
the translation test split (n sentences) with its 95% paired-bootstrap interval against the original
and against REAP pruning; time of the compression step; output bytes (parameters in the source dtype,
novice constants included; a tied merge writes every member).

    nice -n 10 python bench/bench_merge.py [--ratios 0.25,0.5,0.75] [--methods reap-prune,mone,...]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import scipy.cluster.hierarchy  # noqa: E402,F401  (imported up front: no method pays for it)
import scipy.optimize  # noqa: E402,F401
import torch  # noqa: E402

from moe_slim.api import plan_for  # noqa: E402
from moe_slim.evals.data import read_jsonl  # noqa: E402
from moe_slim.evals.run import evaluate  # noqa: E402
from moe_slim.evals.translation import paired_bootstrap  # noqa: E402
from moe_slim.experts.batches import make_batches  # noqa: E402
from moe_slim.experts.merge.driver import merge_model  # noqa: E402
from moe_slim.experts.mone import install_novices, novice_plan  # noqa: E402
from moe_slim.experts.observe import observe  # noqa: E402
from moe_slim.experts.prune import apply_plan, count_parameters  # noqa: E402
from moe_slim.experts.superexperts import super_experts  # noqa: E402
from moe_slim.families import moe_layers  # noqa: E402

DOMAINS = ("general", "math", "code", "translation")
VARIANTS = ("reap-prune", "freq-prune", "mone", "ream", "ream-repo", "hc-smoe", "hc-smoe-tied", "m-smoe", "average")
# also measured (README): reap-prune+super, mone+super, ream+super (super-experts on/off) and
# hc-smoe@method (HC-SMoE's own representative's router row, as shipped before issue 19)


def load_texts(data_dir: Path, split: str) -> dict[str, list[str]]:
    return {d: [str(r["text"]) for r in read_jsonl(data_dir / d / f"{split}.jsonl")] for d in DOMAINS
            if (data_dir / d / f"{split}.jsonl").is_file()}


def compress(variant: str, base: torch.nn.Module, stats, ratio: float, args) -> tuple[torch.nn.Module, float, int]:
    """(model, seconds, output bytes)."""
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    tokens = args.samples * len(stats.domains)
    extra = 0
    protect = variant.endswith("+super")  # any variant: never remove or merge a super-expert
    variant = variant.removesuffix("+super")
    variant, *opts = variant.split(":")  # ream:weighting=p2norm-routed, m-smoe:dominants=saliency, ...
    choice: dict = {k: {"true": True, "false": False}.get(v, int(v) if v.isdigit() else v)
                    for k, v in (o.split("=", 1) for o in opts)}
    variant, _, row = variant.partition("@")  # hc-smoe@method: the router row rule (frequency, saliency, method)
    choice.update({"router_row": row} if row else {})
    if variant in ("reap-prune", "freq-prune"):
        crit = "frequency" if variant == "freq-prune" else "reap"
        apply_plan(model, plan_for(model, stats, criterion=crit, ratio=ratio, protect_super=protect))
    elif variant == "mone":
        plan = plan_for(model, stats, criterion="mone", ratio=ratio, protect_super=protect)
        install_novices(model, novice_plan(plan, stats))
        per = [sum(p.numel() for p in l.experts.parameters()) / l.num_experts for l in moe_layers(model)]
        novices = [plan.num_experts - len(l.keep) for l in plan.layers]
        hidden = moe_layers(model)[0].router_weight.shape[-1]
        extra = int(sum(n * (hidden - p) for n, p in zip(novices, per)))  # weights dropped, constants added
    elif variant == "hc-smoe-tied":
        merge_model(model, stats, "hc-smoe", ratio, max_tokens=tokens, tied=True, protect_super=protect)
    else:
        merge_model(model, stats, variant, ratio, max_tokens=tokens, protect_super=protect, calibration=args.calib,
                    tokenizer=args.tok, seq_len=args.seq_len, **choice)  # the text: sequential merges (ream-repo)
    secs = time.perf_counter() - t0
    return model, secs, (count_parameters(model) + extra) * args.bytes_per_param


@torch.no_grad()
def token_kl(ref_logits: list[torch.Tensor], model: torch.nn.Module, batches: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per held-out text: summed KL(original || model), top-1 agreements, tokens."""
    kl, agree, n = [], [], []
    for ref, b in zip(ref_logits, batches):
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
        mask = b.attention_mask.bool()
        p, q = ref.log_softmax(-1), out.log_softmax(-1)
        tok_kl = (p.exp() * (p - q)).sum(-1) * mask
        kl += tok_kl.sum(1).tolist()
        agree += ((p.argmax(-1) == q.argmax(-1)) & mask).sum(1).tolist()
        n += mask.sum(1).tolist()
    return np.array(kl), np.array(agree), np.array(n)


def kl_diff_ci(a: tuple, b: tuple, n_samples: int = 1000, seed: int = 12345) -> list[float]:
    """95% paired-bootstrap interval (over texts) of mean-per-token KL(a) - KL(b)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(a[0]), size=(n_samples, len(a[0])), replace=True)
    diffs = a[0][idx].sum(1) / a[2][idx].sum(1) - b[0][idx].sum(1) / b[2][idx].sum(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return [float(lo), float(hi)]


def chrf_vs(hyps: list[str], other: list[str], refs: list[str]) -> dict:
    return paired_bootstrap(hyps, other, refs, metrics=("chrf",))["chrf"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "reference"))
    ap.add_argument("--data", default=str(ROOT / "data"))
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--calib-tokens", type=int, default=8000, help="calibration tokens observed per domain")
    ap.add_argument("--samples", type=int, default=2048, help="merge sample tokens per domain and layer")
    ap.add_argument("--held-out", type=int, default=12, help="held-out texts per domain for KL / top-1")
    ap.add_argument("--limit", type=int, default=40, help="translation test sentences per language pair")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bytes-per-param", type=int, default=2, help="the source dtype's size (bfloat16: 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    data = Path(args.data)

    from moe_slim.modeling.loading import load_model

    base, tok = load_model(args.model, dtype=torch.float32)
    args.tok = tok
    args.calib = {d: t[:200] for d, t in load_texts(data, "calibration").items()}
    base.eval()
    layers = moe_layers(base)
    E = layers[0].num_experts
    t0 = time.perf_counter()
    stats = observe(base, tok, load_texts(data, "calibration"), seq_len=args.seq_len, batch_size=8,
                    samples=args.samples, max_tokens=args.calib_tokens)
    sup = super_experts(stats)
    print(f"model {args.model}: {count_parameters(base) / 1e6:.2f}M parameters, {len(layers)} MoE layers x {E} experts; "
          f"observe {time.perf_counter() - t0:.0f}s, tokens {dict((d, int(v)) for d, v in stats.meta['tokens_per_domain'].items())}; "
          f"super-experts (robust z > 3.5): {int(sup.sum())} {sup.nonzero().tolist()}", flush=True)

    held = [str(r["text"]) for d in DOMAINS for r in read_jsonl(data / d / "test.jsonl")[: args.held_out]]
    held_batches = make_batches(tok, held, seq_len=128, batch_size=1, max_tokens=None, pack=False)
    with torch.no_grad():
        ref_logits = [base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
                      for b in held_batches]
    refs_by_id = {str(r["id"]): str(r["ref"]) for r in read_jsonl(data / "translation" / "test.jsonl")}

    def translate(model):
        r = evaluate(model, tok, tasks=["translation"], data_dir=data, limit=args.limit)
        hyps = r["tasks"]["translation"]["hypotheses"]
        return [h["hyp"] for h in hyps], [refs_by_id[h["id"]] for h in hyps]

    orig_hyps, refs = translate(base)
    n_tok = int(sum(int(b.attention_mask.sum()) for b in held_batches))
    print(f"held-out: {len(held)} texts, {n_tok} tokens; translation: n={len(refs)} sentences", flush=True)
    orig_bytes = count_parameters(base) * args.bytes_per_param
    rows = []
    for ratio in ratios:
        at: dict[str, tuple] = {}
        for v in variants:
            model, secs, nbytes = compress(v, base, stats, ratio, args)
            kl = token_kl(ref_logits, model, held_batches)
            hyps, _ = translate(model)
            at[v] = (kl, hyps)
            vs_orig = chrf_vs(hyps, orig_hyps, refs)
            rows.append(dict(variant=v, ratio=ratio, kl=kl, hyps=hyps, secs=secs, bytes=nbytes, vs_orig=vs_orig))
            print(f"  {v:17s} {ratio:.0%}: KL {kl[0].sum() / kl[2].sum():.4f} top-1 {kl[1].sum() / kl[2].sum():.3f} "
                  f"chrF {vs_orig['system']:.2f} ({secs:.1f}s)", flush=True)
            del model
        for r in rows:
            if r["ratio"] == ratio and "reap-prune" in at:
                ref_kl, ref_hyps = at["reap-prune"]
                r["kl_vs_reap"] = kl_diff_ci(r["kl"], ref_kl)
                r["vs_reap"] = chrf_vs(r["hyps"], ref_hyps, refs)

    print(f"\noriginal: chrF {rows[0]['vs_orig']['baseline']:.2f} (n={len(refs)}), {orig_bytes / 1e6:.2f} MB\n")
    print("| variant | removed | KL | ΔKL vs REAP prune [95% CI] | top-1 | chrF [95% CI] | ΔchrF vs original [95% CI] "
          "| ΔchrF vs REAP prune [95% CI] | time s | output MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kl, o, p = r["kl"], r["vs_orig"], r.get("vs_reap")
        mean_kl = kl[0].sum() / kl[2].sum()
        dkl = (f"{mean_kl - rows_kl(rows, r['ratio']):+.4f} [{r['kl_vs_reap'][0]:+.4f}, {r['kl_vs_reap'][1]:+.4f}]"
               if "kl_vs_reap" in r else "")
        dp = f"{p['delta']:+.2f} [{p['delta_ci95'][0]:+.2f}, {p['delta_ci95'][1]:+.2f}]" if p else ""
        print(f"| {r['variant']} | {r['ratio']:.0%} | {mean_kl:.4f} | {dkl} | {kl[1].sum() / kl[2].sum():.3f} | "
              f"{o['system']:.2f} [{o['system_ci95'][0]:.2f}, {o['system_ci95'][1]:.2f}] | "
              f"{o['delta']:+.2f} [{o['delta_ci95'][0]:+.2f}, {o['delta_ci95'][1]:+.2f}] | {dp} | {r['secs']:.1f} | "
              f"{r['bytes'] / 1e6:.2f} |")


def rows_kl(rows: list[dict], ratio: float) -> float:
    r = next(r for r in rows if r["ratio"] == ratio and r["variant"] == "reap-prune")
    return float(r["kl"][0].sum() / r["kl"][2].sum())


if __name__ == "__main__":
    main()
