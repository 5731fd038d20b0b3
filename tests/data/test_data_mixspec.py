"""Mix specs: text and YAML forms, budgets, and one-line errors naming the bad part."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_slim.data.mixspec import MixSpec, parse_mix, parse_tokens
from moe_slim.errors import MoeSlimError

REPO = Path(__file__).resolve().parents[2]


def test_text_form_with_budget():
    m = parse_mix("general=0.25,math=0.25,code=0.25,translation=0.25@200k")
    assert m.weights == {"general": 0.25, "math": 0.25, "code": 0.25, "translation": 0.25}
    assert m.tokens == 200_000
    assert m.domains == ["general", "math", "code", "translation"]


def test_weights_need_not_sum_to_one():
    m = parse_mix("translation=3, general=1")
    assert m.tokens is None
    n = m.normalized()
    assert n.weights == {"translation": 0.75, "general": 0.25}
    assert sum(n.weights.values()) == pytest.approx(1.0)


def test_zero_weight_domain_is_kept_but_not_active():
    m = parse_mix("translation=1,code=0@1M")
    assert m.domains == ["translation"] and m.tokens == 1_000_000
    assert m.token_budget() == {"translation": 1_000_000, "code": 0}


@pytest.mark.parametrize("text, tokens", [("50000", 50000), ("200k", 200_000), ("1.5M", 1_500_000), ("2G", 2 * 10**9),
                                          ("64K", 64_000)])
def test_token_suffixes(text, tokens):
    assert parse_tokens(text) == tokens


def test_yaml_form(tmp_path):
    p = tmp_path / "mix.yaml"
    p.write_text("weights:\n  translation: 3\n  general: 1\ntokens: 50k\n")
    assert parse_mix(p) == MixSpec({"translation": 3.0, "general": 1.0}, 50_000)
    p.write_text("weights: {math: 1}\n")
    assert parse_mix(str(p)) == MixSpec({"math": 1.0}, None)


def test_shipped_example_mixes_parse():
    files = sorted((REPO / "calibration" / "mixes").glob("*.yaml"))
    assert {f.stem for f in files} >= {"balanced", "translation", "general"}
    for f in files:
        m = parse_mix(f)
        assert m.domains and m.tokens


@pytest.mark.parametrize("text, part", [
    ("general=0,math=0", "all zero"),
    ("general=-1,math=1", "'-1'"),
    ("general=abc", "'abc'"),
    ("general=1,general=2", "appears twice"),
    ("general", "'general'"),
    ("general=1,,math=1", "empty entry"),
    ("general=1@lots", "'lots'"),
    ("general=1@0", "'0'"),
    ("general=1@1k@2k", "more than one '@'"),
    ("9lives=1", "'9lives'"),
    ("general=nan", "'nan'"),
    ("", "empty mix spec"),
    ("missing.yaml", "not found"),
])
def test_bad_specs_are_one_line_errors(text, part):
    with pytest.raises(MoeSlimError) as err:
        parse_mix(text)
    msg = str(err.value)
    assert part in msg and "\n" not in msg


@pytest.mark.parametrize("body, part", [
    ("weights: [1, 2]\n", "weights:"),
    ("weights: {a: 1}\nextra: 2\n", "unknown key"),
    ("weights: {a: 0, b: 0}\n", "all zero"),
    ("weights: {a: -2}\n", "'-2'"),
    ("weights: {a: 1}\ntokens: many\n", "'many'"),
    ("weights: {a: 1\n", "not valid YAML"),
    ("- a\n", "must be a mapping"),
])
def test_bad_yaml(tmp_path, body, part):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(MoeSlimError) as err:
        parse_mix(p)
    assert part in str(err.value) and "\n" not in str(err.value)
