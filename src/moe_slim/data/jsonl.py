"""Reading and writing the JSONL files of a data directory, with one-line errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import MoeSlimError
from .formats import CATALOG_SPLITS, SPLITS

MANIFEST = "manifest.json"


def dumps_jsonl(records: Iterable[dict]) -> str:
    """Records as JSONL text (UTF-8, one compact object per line)."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


def read_jsonl(path: str | os.PathLike, *, require: tuple[str, ...] = ("text",), allow_empty: bool = False) -> list[dict]:
    """The records of a JSONL file. Missing or empty file (unless ``allow_empty``), a line that is
    not a JSON object, or a record without a required string field is a one-line MoeSlimError
    naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise MoeSlimError(f"{p} not found" if not p.exists() else f"{p} is not a file")
    records: list[dict] = []
    try:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MoeSlimError(f"{p} line {n} is not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict):
                    raise MoeSlimError(f"{p} line {n} is not a JSON object (each line must be an object "
                                       f"with a {require[0] if require else 'text'!r} field)")
                for key in require:
                    if not isinstance(rec.get(key), str):
                        raise MoeSlimError(f"{p} line {n} has no {key!r} string field (each line must be a "
                                           f"JSON object like {{\"{key}\": \"...\"}})")
                records.append(rec)
    except UnicodeDecodeError:
        raise MoeSlimError(f"{p} is not UTF-8 text") from None
    except OSError as exc:
        raise MoeSlimError(f"cannot read {p}: {exc.strerror or exc}") from None
    if not records and not allow_empty:
        raise MoeSlimError(f"{p} is empty (it needs one JSON object per line with a 'text' field)")
    return records


def read_manifest(data_dir: str | os.PathLike = "data") -> dict:
    """The manifest of a built data directory."""
    p = Path(data_dir) / MANIFEST
    if not p.is_file():
        raise MoeSlimError(f"{p} not found (build the data with: moe-slim data build --out {data_dir})")
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoeSlimError(f"{p} is unreadable ({exc}); rebuild with moe-slim data build --overwrite") from None
    if not isinstance(manifest, dict) or "domains" not in manifest:
        raise MoeSlimError(f"{p} is not a moe_slim data manifest (rebuild with moe-slim data build --overwrite)")
    return manifest


def load_split(data_dir: str | os.PathLike, domain: str, split: str) -> list[dict]:
    """The records of ``<data_dir>/<domain>/<split>.jsonl`` (a built split may be empty)."""
    if split not in SPLITS + CATALOG_SPLITS:
        raise MoeSlimError(f"unknown split {split!r} (splits are {', '.join(SPLITS + CATALOG_SPLITS)})")
    path = Path(data_dir) / domain / f"{split}.jsonl"
    if not path.is_file():
        have = sorted(d.name for d in Path(data_dir).iterdir() if d.is_dir()) if Path(data_dir).is_dir() else []
        if split in CATALOG_SPLITS and domain in have:
            raise MoeSlimError(f"{path} not found: catalog-level splits exist for translation only "
                               "(and in data built by moe_slim 0.4 or later; rebuild with moe-slim data build)")
        raise MoeSlimError(f"{path} not found (domains in {data_dir}: {', '.join(have) or 'none'}; "
                           f"build the data with: moe-slim data build --out {data_dir})")
    return read_jsonl(path, allow_empty=True)
