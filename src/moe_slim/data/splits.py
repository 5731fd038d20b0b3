"""Deterministic splits with no text shared between them.

1. Exact duplicates (same normalised text) are dropped before splitting (:func:`dedupe`).
2. Records are grouped: same normalised key, same explicit group (e.g. one math template, one
   translation source across languages), or near-duplicate keys (MinHash over character
   5-grams, LSH banding, verified by estimated Jaccard >= ``threshold``). A whole group always
   lands in one split (:func:`near_dup_groups`, :func:`split_records`).
3. Groups (named by their smallest member id) are visited in seeded-hash order and each goes to
   the split furthest below its target share, so the assignment does not depend on input order,
   changes only with the seed, and split sizes follow the fractions even for a few large groups.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import MoeSlimError
from .formats import SPLITS

DEFAULT_FRACTIONS: dict[str, float] = {"calibration": 0.1, "train": 0.7, "validation": 0.1, "test": 0.1}

_NON_WORD = re.compile(r"[\W_]+")
_MASK64 = (1 << 64) - 1


def normalize_text(text: str) -> str:
    """Casefolded NFKC text with punctuation and whitespace runs collapsed to one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def stable_hash(*parts: Any) -> int:
    """A 64-bit hash of the parts' string forms (sha256; independent of PYTHONHASHSEED)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big")


def stable_unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    return stable_hash(*parts) / 2.0**64


def dedupe(records: Iterable[dict], key: Callable[[dict], str] = lambda r: r["text"]) -> tuple[list[dict], int]:
    """Drop records whose normalised ``key`` was already seen. Records are visited in id order, so
    the survivor does not depend on input order. Returns (kept, number dropped)."""
    seen: set[str] = set()
    kept: list[dict] = []
    dropped = 0
    for r in sorted(records, key=lambda r: r["id"]):
        k = normalize_text(key(r))
        if k in seen:
            dropped += 1
            continue
        seen.add(k)
        kept.append(r)
    return kept, dropped


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, wrapping uint64 arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, k: int = 5, *, normalized: bool = False) -> np.ndarray:
    """Unique 64-bit hashes of the character k-grams of the normalised text."""
    data = (text if normalized else normalize_text(text)).encode("utf-8")
    if not data:
        return np.zeros(1, dtype=np.uint64)
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    if len(b) < k:
        b = np.concatenate([b, np.zeros(k - len(b), dtype=np.uint64)])
    n = len(b) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):
        h = h * np.uint64(257) + b[j:j + n]
    return np.unique(_mix64(h))


class MinHasher:
    """MinHash signatures with ``num_perm`` seeded multiply-add-shift hash functions."""

    def __init__(self, num_perm: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, text: str, k: int = 5, *, normalized: bool = False) -> np.ndarray:
        h = shingle_hashes(text, k, normalized=normalized)
        out = np.empty(len(self.a), dtype=np.uint64)
        step = max(1, (1 << 20) // max(1, len(self.a)))  # bound the temporary (n x perms) array
        out[:] = np.iinfo(np.uint64).max
        with np.errstate(over="ignore"):
            for s in range(0, len(h), step):
                part = (h[s:s + step, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)
                np.minimum(out, part.min(axis=0), out=out)
        return out


def near_dup_groups(texts: Sequence[str], *, threshold: float = 0.5, num_perm: int = 64, bands: int = 16,
                    k: int = 5, extra_groups: Sequence[str | None] | None = None, seed: int = 0) -> list[int]:
    """A group index per text: equal normalised texts, equal ``extra_groups`` keys (when given,
    None means no extra group) and near-duplicates (estimated Jaccard of character k-grams >=
    ``threshold``) share a group. The group index is the smallest member position."""
    n = len(texts)
    if num_perm % bands:
        raise MoeSlimError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        key = normalize_text(t)
        if key in first:
            uf.union(first[key], i)
        else:
            first[key] = i
    if extra_groups is not None:
        seen: dict[str, int] = {}
        for i, g in enumerate(extra_groups):
            if g is None:
                continue
            if g in seen:
                uf.union(seen[g], i)
            else:
                seen[g] = i
    # one signature per distinct normalised text
    reps = sorted(first.values())
    hasher = MinHasher(num_perm, seed)
    sigs = (np.stack([hasher.signature(key, k, normalized=True) for key, i in sorted(first.items(), key=lambda kv: kv[1])])
            if reps else np.zeros((0, num_perm), np.uint64))
    rows = num_perm // bands
    for band in range(bands):
        buckets: dict[bytes, int] = {}
        chunk = np.ascontiguousarray(sigs[:, band * rows:(band + 1) * rows])
        for j in range(len(reps)):
            key = chunk[j].tobytes()
            other = buckets.get(key)
            if other is None:
                buckets[key] = j
            elif uf.find(reps[other]) != uf.find(reps[j]):
                if float(np.mean(sigs[other] == sigs[j])) >= threshold:
                    uf.union(reps[other], reps[j])
    return [uf.find(i) for i in range(n)]


def check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise MoeSlimError(f"unknown split(s) {sorted(unknown)} (splits are {', '.join(SPLITS)})")
    if any(not (v >= 0) for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise MoeSlimError(f"split fractions must be non-negative and not all zero, got {fractions}")
    total = sum(fractions.values())
    return {s: fractions.get(s, 0.0) / total for s in SPLITS}


def assign_groups(sizes: dict[str, int], *, seed: int, fractions: dict[str, float], salt: str = "") -> dict[str, str]:
    """Split of each group (key -> record count). Groups are visited in seeded-hash order and each
    goes to the split furthest below its share so far, so split sizes follow ``fractions`` closely
    even with few, large groups. Deterministic in (seed, salt, keys, sizes); input order is irrelevant."""
    fr = check_fractions(fractions)
    active = [s for s in SPLITS if fr[s] > 0]
    counts = dict.fromkeys(SPLITS, 0)
    total = 0
    out: dict[str, str] = {}
    for key in sorted(sizes, key=lambda k: (stable_hash(seed, salt, k), k)):
        total += sizes[key]
        best = max(active, key=lambda s: (fr[s] * total - counts[s], -SPLITS.index(s)))
        counts[best] += sizes[key]
        out[key] = best
    return out


def split_records(records: Sequence[dict], *, seed: int, fractions: dict[str, float] | None = None,
                  key: Callable[[dict], str] = lambda r: r["text"],
                  group: Callable[[dict], str | None] | None = None,
                  threshold: float = 0.5, salt: str = "") -> dict[str, list[dict]]:
    """Assign every record to a split so that a group (see :func:`near_dup_groups` over ``key``,
    plus ``group`` keys) never spans two splits; split sizes follow ``fractions``
    (:func:`assign_groups`). Deterministic in (seed, record ids, keys); records sorted by id."""
    fr = check_fractions(fractions or DEFAULT_FRACTIONS)
    recs = sorted(records, key=lambda r: r["id"])
    ids = [r["id"] for r in recs]
    if len(set(ids)) != len(ids):
        raise MoeSlimError("record ids are not unique (deduplicate before splitting)")
    groups = near_dup_groups([key(r) for r in recs], threshold=threshold,
                             extra_groups=[group(r) for r in recs] if group else None, seed=seed)
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[ids[g]] = sizes.get(ids[g], 0) + 1
    where = assign_groups(sizes, seed=seed, fractions=fr, salt=f"split:{salt}")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r, g in zip(recs, groups):
        out[where[ids[g]]].append(r)
    return out


def hold_out_catalogs(records: Sequence[dict], *, seed: int, fraction: float, catalog: Callable[[dict], str],
                      key: Callable[[dict], str] = lambda r: r["text"], threshold: float = 0.5,
                      names: Sequence[str] = ("catalog_test", "catalog_validation"),
                      ) -> tuple[dict[str, list[dict]], list[dict], dict[str, list[str]]]:
    """Whole catalogs set aside as catalog-level splits, each about ``fraction`` of the records.

    Catalogs are visited in seeded-hash order (ties by name) and fill ``names`` in turn; a catalog
    larger than half a split's share is skipped so that no split is one catalog. A record whose
    key near-duplicates (see :func:`near_dup_groups`) a record of another split's catalog is not
    held out, so no text of a catalog-level split is seen elsewhere. Returns (records per
    catalog-level split, the remaining records, chosen catalogs per split); deterministic in
    (seed, record ids, keys, catalogs), records sorted by id."""
    recs = sorted(records, key=lambda r: r["id"])
    sizes: dict[str, int] = {}
    for r in recs:
        sizes[catalog(r)] = sizes.get(catalog(r), 0) + 1
    target = fraction * len(recs)
    chosen: dict[str, list[str]] = {n: [] for n in names}
    filled = dict.fromkeys(names, 0)
    for c in sorted(sizes, key=lambda c: (stable_hash(seed, "catalog", c), c)):
        if sizes[c] > target / 2:
            continue
        todo = [n for n in names if filled[n] < target]
        if not todo:
            break
        chosen[todo[0]].append(c)
        filled[todo[0]] += sizes[c]
    where = {c: n for n, cs in chosen.items() for c in cs}
    groups = near_dup_groups([key(r) for r in recs], threshold=threshold, seed=seed)
    owners: dict[int, set[str | None]] = {}
    for r, g in zip(recs, groups):
        owners.setdefault(g, set()).add(where.get(catalog(r)))
    held: dict[str, list[dict]] = {n: [] for n in names}
    rest: list[dict] = []
    for r, g in zip(recs, groups):
        own = owners[g]
        if len(own) == 1 and None not in own:
            held[next(iter(own))].append(r)
        else:
            rest.append(r)
    return held, rest, {n: sorted(cs) for n, cs in chosen.items()}
