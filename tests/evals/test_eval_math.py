"""Final-answer extraction and number normalisation for generative math."""

from __future__ import annotations

import pytest

from moe_slim.evals.math_gen import answers_match, extract_answer, normalize_answer


@pytest.mark.parametrize("text, expected", [
    ("He has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("So the total is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("The answer is $1,250.", "$1,250"),
    ("First 12, then 15, finally 18 apples", "18"),
    ("no numbers here", None),
])
def test_extract(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold", [
    ("1,250", "1250"), ("$1,250.00", "1250"), ("3.0", "3"), ("\\frac{1}{2}", "0.5"), ("1/2", "0.50"),
    ("50%", "50"), ("-4", "-4"), (" Paris ", "paris"), ("7.", "7"),
])
def test_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred, gold", [("7", "8"), (None, "7"), ("", ""), ("0.33", "1/3")])
def test_mismatch(pred, gold):
    assert not answers_match(pred, gold)


def test_normalize_forms():
    assert normalize_answer("12") == normalize_answer("12.000") == "12"
    assert normalize_answer("\\text{Blue}") == "blue"
