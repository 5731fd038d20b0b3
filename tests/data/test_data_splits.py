"""Splits: disjoint (exact and near duplicates never cross), deterministic, sized by fraction."""

from __future__ import annotations

import random

import pytest

from moe_slim.data.formats import SPLITS
from moe_slim.data.splits import (
    assign_groups,
    dedupe,
    near_dup_groups,
    normalize_text,
    split_records,
    stable_hash,
)
from moe_slim.errors import MoeSlimError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau upsilon "
         "phi chi psi omega river mountain forest valley ocean desert island harbour castle garden").split()


def _sentence(rng: random.Random, n: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" {rng.randrange(10**9)}"


def _corpus(seed: int = 0, n: int = 400) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        text = _sentence(rng)
        recs.append({"id": f"r{i:04d}", "text": text})
        if i % 10 == 0:  # a near duplicate: one word changed, different case and punctuation
            words = text.split()
            words[3] = "CHANGED"
            recs.append({"id": f"r{i:04d}-near", "text": " ".join(words).upper() + "!"})
        if i % 25 == 0:  # an exact duplicate modulo case/whitespace
            recs.append({"id": f"r{i:04d}-dup", "text": "  " + text.title() + "  "})
    return recs


def _where(splits: dict[str, list[dict]]) -> dict[str, str]:
    return {r["id"]: s for s, rs in splits.items() for r in rs}


def test_near_duplicates_share_a_group():
    texts = ["the quick brown fox jumps over the lazy dog near the river bank",
             "The quick brown fox jumps over the lazy cat near the river bank.",
             "completely unrelated sentence about compilers and linkers in general"]
    g = near_dup_groups(texts)
    assert g[0] == g[1] != g[2]


def test_splits_are_disjoint_for_exact_and_near_duplicates():
    recs = _corpus()
    kept, dropped = dedupe(recs)
    assert dropped == sum(1 for r in recs if r["id"].endswith("-dup"))
    splits = split_records(kept, seed=3)
    where = _where(splits)
    assert set(where) == {r["id"] for r in kept}
    for r in kept:
        if r["id"].endswith("-near"):
            assert where[r["id"]] == where[r["id"][:-5]]
    # no normalised text appears in two splits
    seen: dict[str, str] = {}
    for s, rs in splits.items():
        for r in rs:
            key = normalize_text(r["text"])
            assert seen.setdefault(key, s) == s


def test_split_sizes_follow_fractions():
    kept, _ = dedupe(_corpus(n=1000))
    splits = split_records(kept, seed=0, fractions={"calibration": 0.1, "train": 0.7, "validation": 0.1, "test": 0.1})
    n = len(kept)
    assert abs(len(splits["train"]) - 0.7 * n) <= 3
    for s in ("calibration", "validation", "test"):
        assert abs(len(splits[s]) - 0.1 * n) <= 3


def test_explicit_groups_stay_together():
    rng = random.Random(1)
    recs = [{"id": f"t{t}-{v}", "text": _sentence(rng), "g": f"template-{t}"} for t in range(40) for v in range(5)]
    splits = split_records(recs, seed=0, group=lambda r: r["g"])
    where = _where(splits)
    for t in range(40):
        assert len({where[f"t{t}-{v}"] for v in range(5)}) == 1


def test_deterministic_and_order_independent():
    kept, _ = dedupe(_corpus())
    a = split_records(kept, seed=7)
    shuffled = list(kept)
    random.Random(5).shuffle(shuffled)
    b = split_records(shuffled, seed=7)
    assert a == b
    c = split_records(kept, seed=8)
    assert _where(a) != _where(c)


def test_dedupe_keeps_the_smallest_id_regardless_of_order():
    recs = [{"id": "b", "text": "Hello, World"}, {"id": "a", "text": "hello world"}]
    kept, dropped = dedupe(recs)
    assert [r["id"] for r in kept] == ["a"] and dropped == 1
    assert dedupe(list(reversed(recs)))[0] == kept


def test_assign_groups_and_hash_are_stable():
    assert stable_hash(0, "x") == stable_hash(0, "x") != stable_hash(1, "x")
    sizes = {f"g{i}": 1 + i % 3 for i in range(50)}
    a = assign_groups(sizes, seed=0, fractions={"train": 1, "test": 1})
    assert a == assign_groups(dict(reversed(sizes.items())), seed=0, fractions={"train": 1, "test": 1})
    assert set(a.values()) == {"train", "test"}


def test_bad_fractions_and_duplicate_ids():
    with pytest.raises(MoeSlimError, match="unknown split"):
        split_records([{"id": "a", "text": "x"}], seed=0, fractions={"dev": 1.0})
    with pytest.raises(MoeSlimError, match="not all zero"):
        split_records([{"id": "a", "text": "x"}], seed=0, fractions={"train": 0})
    with pytest.raises(MoeSlimError, match="not unique"):
        split_records([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], seed=0)
    assert set(SPLITS) == {"calibration", "train", "validation", "test"}
