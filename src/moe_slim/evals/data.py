"""Reading the evaluation data: ``<data_dir>/<domain>/<split>.jsonl`` records, and their hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..data.jsonl import read_jsonl as _read_jsonl
from ..errors import MoeSlimError

DOMAINS: tuple[str, ...] = ("general", "math", "code", "translation")


def split_for(domain: str, split: str) -> str:
    """The split a domain is read from when ``split`` is asked for: catalog-level splits
    (``catalog_test``, ``catalog_validation``) exist for translation only; other domains then use ``test``."""
    from ..data.formats import CATALOG_SPLITS, SPLITS

    if split not in SPLITS + CATALOG_SPLITS:
        raise MoeSlimError(f"unknown split {split!r} (splits are {', '.join(SPLITS + CATALOG_SPLITS)})")
    return split if split in SPLITS or domain == "translation" else "test"


def data_file(data_dir: str | os.PathLike, domain: str, split: str = "test") -> Path:
    """The JSONL file of one domain and split, or a one-line error when it is missing."""
    path = Path(data_dir) / domain / f"{split}.jsonl"
    if not path.is_file():
        raise MoeSlimError(
            f"no {domain} {split} data at {path} (build it with `moe-slim data build --out {data_dir}` "
            "or point --data at a data directory)"
        )
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a JSONL file (blank lines skipped); the data package's reader, no required field."""
    return _read_jsonl(path, require=(), allow_empty=True)


def require_fields(records: list[dict[str, Any]], fields: tuple[str, ...], path: str | os.PathLike) -> None:
    """A one-line error naming the first record that lacks one of ``fields``."""
    for i, rec in enumerate(records):
        missing = [f for f in fields if f not in rec]
        if missing:
            ident = rec.get("id", f"record {i + 1}")
            raise MoeSlimError(f"{path}: {ident} lacks field(s) {', '.join(missing)}; rebuild the data")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DataLedger:
    """Which data files a run read, with their sha256, keyed by path relative to the data dir."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir)
        self.files: dict[str, str] = {}

    def record(self, path: str | os.PathLike, key: str | None = None) -> Path:
        """Record ``path`` under ``key`` (default: its path relative to the data dir; files derived into the
        cache pass their own, machine-independent key such as ``mc/general_cloze.jsonl``)."""
        p = Path(path)
        if key is None:
            try:
                key = p.resolve().relative_to(self.data_dir.resolve()).as_posix()
            except ValueError:
                key = str(p)
        if key not in self.files:
            self.files[key] = file_sha256(p)
        return p

    def load(self, domain: str, split: str = "test") -> list[dict[str, Any]]:
        """Read one domain's split and record its hash."""
        return read_jsonl(self.record(data_file(self.data_dir, domain, split)))
