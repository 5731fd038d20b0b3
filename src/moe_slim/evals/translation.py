"""Translation quality: greedy translations scored with sacrebleu (BLEU, chrF, chrF++).

Scores are corpus-level, per language pair (``en-de``, ``en-fr``, ``en-es``) and overall (all
sentences pooled), with sacrebleu's signature strings so numbers are comparable. A "copy the
source" baseline (hypothesis = source sentence) is scored with chrF per pair: a model that has not
learned to translate scores about that much. Given a baseline system's hypotheses, a seeded paired
bootstrap gives confidence intervals of the difference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from ..errors import MoeSlimError
from ..prompts import END_TAG, cut_generation, translation_prompt
from .generation import encode_prompts, greedy_generate

METRICS: tuple[str, ...] = ("bleu", "chrf", "chrf++")
TRANSLATION_FIELDS: tuple[str, ...] = ("id", "src", "ref", "tgt_lang")
#: Stop strings for a translation: the end tag, a newline, or the start of any other tag.
TRANSLATION_STOPS: tuple[str, ...] = (END_TAG, "\n", "<|")


def make_metric(name: str) -> Any:
    """A fresh sacrebleu metric object with its default settings."""
    if name == "bleu":
        return BLEU()
    if name == "chrf":
        return CHRF()
    if name == "chrf++":
        return CHRF(word_order=2)
    raise MoeSlimError(f"unknown translation metric {name!r} (choose from {', '.join(METRICS)})")


def pair_name(record: Mapping[str, Any]) -> str:
    return f"{record.get('src_lang', 'en')}-{record['tgt_lang']}"


def corpus_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """BLEU, chrF and chrF++ of a corpus (one reference per sentence)."""
    return {name: float(make_metric(name).corpus_score(list(hyps), [list(refs)]).score) for name in METRICS}


def signatures() -> dict[str, str]:
    """sacrebleu's signature string of each metric, as its command line prints it."""
    out = {}
    for name in METRICS:
        metric = make_metric(name)
        metric.corpus_score(["x"], [["x"]])
        out[name] = metric.get_signature().format()
    return out


def score_translations(hyps: Sequence[str], refs: Sequence[str], pairs: Sequence[str],
                       sources: Sequence[str] | None = None) -> dict[str, Any]:
    """Scores per pair and overall; with ``sources``, also the copy-the-source chrF."""
    if not (len(hyps) == len(refs) == len(pairs)):
        raise MoeSlimError("hypotheses, references and pairs must have the same length")
    by_pair: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_pair.setdefault(p, []).append(i)
    out: dict[str, Any] = {"pairs": {}}
    for p in sorted(by_pair):
        idx = by_pair[p]
        entry: dict[str, Any] = {"n": len(idx), **corpus_scores([hyps[i] for i in idx], [refs[i] for i in idx])}
        if sources is not None:
            entry["copy_chrf"] = float(CHRF().corpus_score([sources[i] for i in idx], [[refs[i] for i in idx]]).score)
        out["pairs"][p] = entry
    overall: dict[str, Any] = {"n": len(hyps), **corpus_scores(hyps, refs)}
    if sources is not None:
        overall["copy_chrf"] = float(CHRF().corpus_score(list(sources), [list(refs)]).score)
    out["overall"] = overall
    if out["pairs"]:
        out["macro"] = {m: float(np.mean([e[m] for e in out["pairs"].values()])) for m in METRICS}
    out["signatures"] = signatures()
    return out


def _percentile_ci(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_bootstrap(hyps: Sequence[str], baseline_hyps: Sequence[str], refs: Sequence[str], *,
                     metrics: Sequence[str] = METRICS, n_samples: int = 1000, seed: int = 12345) -> dict[str, Any]:
    """Paired bootstrap of system vs baseline, resampling sentences with sacrebleu's sentence statistics.

    Both systems are scored on the same resampled sets (seeded ``numpy.random.default_rng``).
    Returned per metric: the two scores, the difference, 95% intervals (2.5/97.5 percentiles) of the
    difference and of each system's score, and sacrebleu's paired-bootstrap p-value.
    """
    if not (len(hyps) == len(baseline_hyps) == len(refs)):
        raise MoeSlimError("system, baseline and references must have the same number of sentences")
    n = len(hyps)
    if n == 0:
        raise MoeSlimError("no sentences to compare with the baseline")
    rng = np.random.default_rng(seed)
    idxs = rng.choice(n, size=(n_samples, n), replace=True)
    out: dict[str, Any] = {}
    for name in metrics:
        metric = make_metric(name)
        sys_stats = np.asarray(metric._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=np.float64)
        bl_stats = np.asarray(metric._extract_corpus_statistics(list(baseline_hyps), [list(refs)]), dtype=np.float64)
        sys_score = float(metric._compute_score_from_stats(sys_stats.sum(0)).score)
        bl_score = float(metric._compute_score_from_stats(bl_stats.sum(0)).score)
        sys_samples = np.array([metric._compute_score_from_stats(sys_stats[i].sum(0)).score for i in idxs])
        bl_samples = np.array([metric._compute_score_from_stats(bl_stats[i].sum(0)).score for i in idxs])
        diffs = sys_samples - bl_samples
        # sacrebleu's paired bootstrap p-value: how often a centred resampled |difference| exceeds the real one
        abs_diffs = np.abs(diffs)
        p_value = (int(np.sum(abs_diffs - abs_diffs.mean() > abs(sys_score - bl_score))) + 1) / (n_samples + 1)
        out[name] = {
            "system": sys_score, "baseline": bl_score, "delta": sys_score - bl_score,
            "delta_ci95": _percentile_ci(diffs), "system_ci95": _percentile_ci(sys_samples),
            "baseline_ci95": _percentile_ci(bl_samples), "p_value": p_value,
        }
    return out


def load_baseline(baseline: str | os.PathLike | Sequence[str] | Mapping[str, str]) -> dict[str, str] | list[str]:
    """Baseline hypotheses: from a results JSON (by sentence id), a mapping id -> hyp, or a list in order."""
    if isinstance(baseline, Mapping):
        if "tasks" in baseline or "hypotheses" in baseline:  # an already-parsed results dict
            return _hypotheses_of_results(baseline, "the baseline results")
        return {str(k): str(v) for k, v in baseline.items()}
    if isinstance(baseline, (str, os.PathLike)):
        path = Path(baseline)
        if not path.is_file():
            raise MoeSlimError(f"baseline {path} does not exist (give a results JSON written by `moe-slim eval`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoeSlimError(f"baseline {path} is not a JSON file: {exc}") from exc
        if isinstance(data, list):
            return [str(h) for h in data]
        if not isinstance(data, dict):
            raise MoeSlimError(f"baseline {path} holds neither a results object nor a list of hypotheses")
        return _hypotheses_of_results(data, str(path))
    return [str(h) for h in baseline]


def _hypotheses_of_results(data: Mapping[str, Any], where: str) -> dict[str, str]:
    task = data.get("tasks", {}).get("translation", data)
    hyps = task.get("hypotheses") if isinstance(task, Mapping) else None
    if not hyps:
        raise MoeSlimError(f"{where} has no saved translation hypotheses (evaluate the baseline with the translation task)")
    return {str(h["id"]): str(h["hyp"]) for h in hyps}


def select_records(records: Sequence[Mapping[str, Any]], per_pair: int | None) -> list[Mapping[str, Any]]:
    """The first ``per_pair`` records of each language pair, in file order (all when None)."""
    if per_pair is None:
        return list(records)
    counts: dict[str, int] = {}
    out = []
    for rec in records:
        p = pair_name(rec)
        if counts.get(p, 0) < per_pair:
            counts[p] = counts.get(p, 0) + 1
            out.append(rec)
    return out


def evaluate_translation(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    baseline: str | os.PathLike | Sequence[str] | Mapping[str, str] | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 12345,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Translate every record greedily and score the translations.

    Each record needs ``id``, ``src``, ``ref`` and ``tgt_lang`` (``prompt`` is used when present,
    else the shared prompt format). ``max_new_tokens`` defaults to twice the prompt length plus 16,
    at most 256, per sentence.
    """
    if not records:
        raise MoeSlimError("no translation records to evaluate")
    prompts = [str(r.get("prompt") or translation_prompt(r["src"], r["tgt_lang"], r.get("src_lang", "en")))
               for r in records]
    if max_new_tokens is None:
        budgets: int | list[int] = [min(256, 2 * len(ids) + 16) for ids in encode_prompts(tokenizer, prompts)]
    else:
        budgets = int(max_new_tokens)
    raw = greedy_generate(model, tokenizer, prompts, max_new_tokens=budgets, stop_strings=TRANSLATION_STOPS,
                          batch_size=batch_size, progress=progress)
    hyps = [cut_generation(t) for t in raw]
    refs = [str(r["ref"]) for r in records]
    pairs = [pair_name(r) for r in records]
    sources = [str(r["src"]) for r in records]
    result = score_translations(hyps, refs, pairs, sources=sources)
    result["n"] = len(records)
    if bootstrap_samples:  # is the model better than copying the source? chrF's interval and the paired difference
        result["vs_copy"] = paired_bootstrap(hyps, sources, refs, metrics=("chrf",), n_samples=bootstrap_samples,
                                             seed=seed)["chrf"]
    result["generation"] = {
        "decoding": "greedy", "batch_size": batch_size, "stop_strings": list(TRANSLATION_STOPS),
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else "min(256, 2*prompt_tokens+16)",
    }
    result["hypotheses"] = [{"id": str(r["id"]), "pair": p, "hyp": h} for r, p, h in zip(records, pairs, hyps)]
    if baseline is not None:
        result["baseline"] = compare_with_baseline(records, hyps, baseline, n_samples=bootstrap_samples, seed=seed)
    return result


def compare_results(system: Mapping[str, Any], baseline: Mapping[str, Any], data_dir: str | os.PathLike,
                    split: str = "test", *, n_samples: int = 1000, seed: int = 12345) -> dict[str, Any]:
    """Paired bootstrap between two saved evaluation results (``evaluate``'s hypotheses) on the sentences
    both translated: for comparing two variants after the fact, neither of which was the other's baseline."""
    from .data import data_file, read_jsonl

    hyps = load_baseline(system)
    records = [r for r in read_jsonl(data_file(data_dir, "translation", split)) if str(r["id"]) in hyps]
    return compare_with_baseline(records, [hyps[str(r["id"])] for r in records], baseline,
                                 n_samples=n_samples, seed=seed)


def compare_with_baseline(records: Sequence[Mapping[str, Any]], hyps: Sequence[str],
                          baseline: str | os.PathLike | Sequence[str] | Mapping[str, str], *,
                          n_samples: int = 1000, seed: int = 12345) -> dict[str, Any]:
    """Paired bootstrap against a baseline, per pair and overall, on the sentences both systems translated."""
    base = load_baseline(baseline)
    if isinstance(base, list):
        if len(base) != len(hyps):
            raise MoeSlimError(f"the baseline has {len(base)} hypotheses but {len(hyps)} sentences were translated; "
                               "give one per sentence, in order, or a results JSON")
        matched = list(range(len(hyps)))
        base_hyps = list(base)
    else:
        matched = [i for i, r in enumerate(records) if str(r["id"]) in base]
        if not matched:
            raise MoeSlimError("the baseline shares no sentence ids with this evaluation (was it run on other data?)")
        base_hyps = [base.get(str(r["id"]), "") for r in records]
    pairs = [pair_name(r) for r in records]
    out: dict[str, Any] = {
        "source": str(baseline) if isinstance(baseline, (str, os.PathLike)) else "given in memory",
        "n": len(matched), "method": "paired bootstrap", "samples": n_samples, "seed": seed, "pairs": {},
    }

    def run(idx: list[int]) -> dict[str, Any]:
        return paired_bootstrap([hyps[i] for i in idx], [base_hyps[i] for i in idx],
                                [str(records[i]["ref"]) for i in idx], n_samples=n_samples, seed=seed)

    for p in sorted(set(pairs[i] for i in matched)):
        out["pairs"][p] = run([i for i in matched if pairs[i] == p])
    out["overall"] = run(matched)
    return out
