"""Translation scoring equals sacrebleu's command line; baselines and hypotheses round-trip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_slim.errors import MoeSlimError
from moe_slim.evals.translation import (
    compare_results,
    corpus_scores,
    load_baseline,
    paired_bootstrap,
    score_translations,
    select_records,
)

REFS = [
    "Die Katze sitzt auf der Matte.", "Ein Hund bellt laut im Garten.", "Wir fahren morgen nach Berlin.",
    "Le chat dort sur le canapé.", "Il pleut depuis ce matin.", "El niño come una manzana roja.",
    "La casa tiene un jardín grande.", "Das Wetter ist heute schön.",
]
HYPS = [
    "Die Katze sitzt auf einer Matte.", "Der Hund bellt im Garten.", "Morgen fahren wir nach Berlin.",
    "Le chat dort sur la canapé.", "", "El niño come manzana roja.", "La casa tiene jardín.",
    "Das Wetter ist heute sehr schön.",
]
PAIRS = ["en-de", "en-de", "en-de", "en-fr", "en-fr", "en-es", "en-es", "en-de"]


def _cli(tmp_path: Path, hyps: list[str], refs: list[str], *args: str) -> list[dict]:
    ref_f, hyp_f = tmp_path / "refs.txt", tmp_path / "hyps.txt"
    ref_f.write_text("\n".join(refs) + "\n", encoding="utf-8")
    hyp_f.write_text("\n".join(hyps) + "\n", encoding="utf-8")
    exe = Path(sys.executable).with_name("sacrebleu")
    proc = subprocess.run([str(exe), str(ref_f), "-i", str(hyp_f), "-w", "6", *args],
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    printed = re.findall(r'"score": ([0-9.]+)', proc.stdout)  # the exact printed strings
    out = out if isinstance(out, list) else [out]
    for entry, text in zip(out, printed):
        entry["printed"] = text
    return out


def _as_printed(score: float) -> str:
    """How sacrebleu's JSON output prints a score at width 6: ``float(f"{score:.6f}")``."""
    return json.dumps(float(f"{score:.6f}"))


def test_scores_equal_sacrebleu_command_line(tmp_path):
    ours = score_translations(HYPS, REFS, PAIRS)
    for subset_pair in (None, "en-de"):
        idx = [i for i, p in enumerate(PAIRS) if subset_pair is None or p == subset_pair]
        hyps, refs = [HYPS[i] for i in idx], [REFS[i] for i in idx]
        scores = ours["overall"] if subset_pair is None else ours["pairs"][subset_pair]
        bleu, chrf = _cli(tmp_path, hyps, refs, "-m", "bleu", "chrf")
        (chrfpp,) = _cli(tmp_path, hyps, refs, "-m", "chrf", "--chrf-word-order", "2")
        assert _as_printed(scores["bleu"]) == bleu["printed"]
        assert _as_printed(scores["chrf"]) == chrf["printed"]
        assert _as_printed(scores["chrf++"]) == chrfpp["printed"]
        assert ours["signatures"] == {"bleu": bleu["signature"], "chrf": chrf["signature"],
                                      "chrf++": chrfpp["signature"]}


def test_copy_baseline_and_pairs():
    sources = ["The cat sits on the mat."] * len(REFS)
    out = score_translations(HYPS, REFS, PAIRS, sources=sources)
    assert set(out["pairs"]) == {"en-de", "en-fr", "en-es"}
    assert out["pairs"]["en-de"]["n"] == 4 and out["overall"]["n"] == len(REFS)
    de = [i for i, p in enumerate(PAIRS) if p == "en-de"]
    assert out["pairs"]["en-de"]["copy_chrf"] == pytest.approx(
        corpus_scores([sources[i] for i in de], [REFS[i] for i in de])["chrf"])


def test_paired_bootstrap_is_seeded_and_consistent():
    base = [h.replace("Die", "Der") for h in HYPS]
    a = paired_bootstrap(HYPS, base, REFS, n_samples=200, seed=7)
    b = paired_bootstrap(HYPS, base, REFS, n_samples=200, seed=7)
    assert a == b
    direct = corpus_scores(HYPS, REFS)
    for m in ("bleu", "chrf", "chrf++"):
        assert a[m]["system"] == pytest.approx(direct[m])
        lo, hi = a[m]["delta_ci95"]
        assert lo <= hi and 0 < a[m]["p_value"] <= 1
    same = paired_bootstrap(HYPS, HYPS, REFS, n_samples=50, seed=1)
    assert same["chrf"]["delta"] == 0 and same["chrf"]["delta_ci95"] == [0.0, 0.0]


def test_load_baseline_forms(tmp_path):
    results = {"kind": "moe_slim.eval", "tasks": {"translation": {"hypotheses": [{"id": "a", "pair": "en-de",
                                                                                  "hyp": "x"}]}}}
    path = tmp_path / "res.json"
    path.write_text(json.dumps(results))
    assert load_baseline(path) == {"a": "x"}
    assert load_baseline(results) == {"a": "x"}
    assert load_baseline(["p", "q"]) == ["p", "q"]
    with pytest.raises(MoeSlimError):
        load_baseline(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text(json.dumps({"tasks": {}}))
    with pytest.raises(MoeSlimError, match="no saved translation hypotheses"):
        load_baseline(tmp_path / "empty.json")


def test_select_records_per_pair():
    recs = [{"id": str(i), "tgt_lang": lang} for i, lang in enumerate(["de", "de", "fr", "de", "es", "fr"])]
    assert [r["id"] for r in select_records(recs, 1)] == ["0", "2", "4"]
    assert len(select_records(recs, None)) == 6


def test_compare_results_pairs_two_saved_results_on_the_sentences_both_translated(tmp_path):
    langs = ["de", "de", "de", "fr", "fr", "es", "es", "de"]
    records = [{"id": f"s{i}", "src": "x", "ref": r, "src_lang": "en", "tgt_lang": lang}
               for i, (r, lang) in enumerate(zip(REFS, langs))]
    (tmp_path / "translation").mkdir()
    (tmp_path / "translation" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def results(hyps, ids):
        return {"tasks": {"translation": {"hypotheses": [{"id": f"s{i}", "pair": "", "hyp": hyps[i]} for i in ids]}}}

    base = [h.replace("Die", "Der") for h in HYPS]
    ids = [0, 1, 2, 3, 5, 6]  # the system translated a subset (e.g. --limit); only those are compared
    out = compare_results(results(HYPS, ids), results(base, range(8)), tmp_path, n_samples=200, seed=7)
    direct = paired_bootstrap([HYPS[i] for i in ids], [base[i] for i in ids], [REFS[i] for i in ids],
                              n_samples=200, seed=7)
    assert out["n"] == len(ids)
    assert out["overall"]["chrf"] == direct["chrf"]
