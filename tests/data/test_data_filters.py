"""Which gettext pairs are kept: templates, short strings, markup, dedup; and the math format."""

from __future__ import annotations

import pytest

from moe_slim.data.filters import (
    Pair,
    clean_pair,
    dedupe_pairs,
    placeholder_kind,
    reject_reason,
)
from moe_slim.data.formats import (
    extract_math_answer,
    math_prompt,
    math_target,
    math_text,
    normalize_math_answer,
)
from moe_slim.data.sources import chunk_python, parse_fortunes, split_gsm_answer

DE = "Die Datei konnte nicht gelesen werden und wurde übersprungen"


@pytest.mark.parametrize("src", [
    "Could not open file %s for reading",
    "Could not open file %1$s for reading",
    "Copied %d of %lu files so far",
    "Progress is %.1f percent of the total",
    "Could not open file {0} for reading",
    "Could not open file {name} for reading",
    "Could not open file {} for reading",
    "Could not open file ${FILE} for reading",
    "Could not open file $HOME for reading",
    "Could not open file %(path)s for reading",
    "Could not open file %1 for reading now",
    "Size of the file is %<PRIu64> bytes",
])
def test_format_templates_are_dropped(src):
    assert placeholder_kind(src) is not None
    assert reject_reason(src, DE) == "format template"
    assert clean_pair(src, DE) is None


def test_literal_percent_is_not_a_template():
    assert placeholder_kind("Use 100%% of the disk space now") is None


@pytest.mark.parametrize("src, ref, reason", [
    ("Open file", "Datei öffnen", "too short"),
    ("Open the file", "Die Datei öffnen", "too short"),
    ("", "x", "empty"),
    ("Could not read the file\nbecause it is locked", DE, "multi-line or control characters"),
    ("Click <b>here</b> to open the file", DE, "markup"),
    ("_Open the selected file now", DE, "keyboard shortcut marker"),
    ("Use --force to overwrite the file", DE, "command-line option"),
    ("See https://example.org for more details", DE, "url or e-mail"),
    ("The file could not be read", "The file could not be read", "untranslated"),
])
def test_noise_is_dropped(src, ref, reason):
    assert reject_reason(src, ref) == reason


def test_good_pair_is_kept_with_normalised_whitespace():
    assert clean_pair("  Could not  read the   file. ", " Die Datei konnte nicht gelesen werden. ") == (
        "Could not read the file.", "Die Datei konnte nicht gelesen werden.")


def test_trailing_newline_is_allowed():
    assert clean_pair("Could not read the file.\n", "Die Datei konnte nicht gelesen werden.\n") is not None


def test_dedupe_same_source_and_language():
    pairs = [
        Pair("Could not read the file.", "Datei nicht lesbar.", "de", "/b.mo"),
        Pair("Could not read the file.", "Die Datei konnte nicht gelesen werden.", "de", "/c.mo"),
        Pair("Could not read the file.", "Die Datei konnte nicht gelesen werden.", "de", "/a.mo"),
        Pair("Could not read the file.", "Impossible de lire le fichier.", "fr", "/a.mo"),
    ]
    out = dedupe_pairs(pairs)
    assert len(out) == 2
    de = next(p for p in out if p.lang == "de")
    assert de.ref == "Die Datei konnte nicht gelesen werden." and de.origin == "/a.mo"  # most frequent ref
    assert dedupe_pairs(list(reversed(pairs))) == out  # order-independent


def test_math_format_round_trip():
    text = math_text("How many apples?", "2 + 3 = 5", "5")
    assert text.startswith(math_prompt("How many apples?"))
    assert text == "Question: How many apples?\nAnswer: 2 + 3 = 5\n#### 5"
    assert text.endswith(math_target("2 + 3 = 5", "5"))
    assert extract_math_answer(math_target("2 + 3 = 5", "1,234")) == "1234"
    assert extract_math_answer("no answer here") is None
    assert normalize_math_answer(" 12.0. ") == "12"
    assert normalize_math_answer("\\boxed{7}") == "7"


def test_gsm_answer_split_removes_calculator_annotations():
    sol, ans = split_gsm_answer("He has 6*2 = <<6*2=12>>12 eggs.\n#### 12")
    assert sol == "He has 6*2 = 12 eggs." and ans == "12"
    with pytest.raises(ValueError):
        split_gsm_answer("no final answer")


def test_fortune_parsing():
    text = "First fortune,\n\tindented.\n%\n%\nSecond one.\n\t\t-- Someone\n%\n"
    assert parse_fortunes(text) == ["First fortune,\nindented.", "Second one.\n-- Someone"]


def test_python_chunking_by_top_level_definitions():
    body = "    x = 1\n" * 30
    src = f"import os\n\n\ndef f():\n{body}\n\n@deco\nclass C:\n{body}\n    def m(self):\n{body}"
    chunks = chunk_python(src, min_chars=50, max_chars=10_000)
    starts = [c.split("\n", 1)[0] for _, c in chunks]
    assert starts[-2:] == ["def f():", "@deco"] or starts[-1] == "@deco"
    assert all(len(c) <= 20_000 for _, c in chunks)
    small = chunk_python(src, min_chars=50, max_chars=200)
    assert all(len(c) <= 400 for _, c in small)
