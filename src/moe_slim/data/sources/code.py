"""Code: the Python standard library's source, chunked at function and class boundaries.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

from .base import SourceData, SourceInfo, SourceMissing

# --------------------------------------------------------------------------------------------
# code: the interpreter's standard library

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
              "pydoc_data", "ensurepip", "lib2to3", "turtledemo", "venv"}
_TOP_LEVEL = re.compile(r"^(?:async\s+def|def|class|@)\b|^@")
_METHOD = re.compile(r"^\s{4}(?:async\s+def|def|@)")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _split_long(lines: list[str], max_chars: int) -> list[list[str]]:
    """Cut a too-long segment at method boundaries, then at blank lines, then anywhere."""
    pieces: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for line in lines:
        boundary = _METHOD.match(line) or not line.strip()
        if cur and size + len(line) + 1 > max_chars and (boundary or size > max_chars):
            pieces.append(cur)
            cur, size = [], 0
        cur.append(line)
        size += len(line) + 1
    if cur:
        pieces.append(cur)
    return pieces


def chunk_python(source: str, *, min_chars: int = 200, max_chars: int = 4000) -> list[tuple[int, str]]:
    """(first line number, chunk) pieces of a Python file: one per top-level def/class (with its
    decorators) or run of module-level code; long ones cut further, short ones merged."""
    lines = [line.rstrip() for line in source.splitlines()]
    segments: list[tuple[int, list[str]]] = []
    cur: list[str] = []
    start = 1
    for i, line in enumerate(lines, 1):
        if _TOP_LEVEL.match(line) and cur and not (cur[-1].startswith("@")):
            segments.append((start, cur))
            cur, start = [], i
        cur.append(line)
    if cur:
        segments.append((start, cur))
    pieces: list[tuple[int, str]] = []
    for first, seg in segments:
        line_no = first
        for part in _split_long(seg, max_chars):
            text = "\n".join(part).strip("\n")
            pieces.append((line_no, text))
            line_no += len(part)
    merged: list[tuple[int, str]] = []
    for line_no, text in pieces:
        if merged and len(merged[-1][1]) < min_chars and len(merged[-1][1]) + len(text) + 2 <= max_chars:
            merged[-1] = (merged[-1][0], merged[-1][1] + "\n\n" + text)
        else:
            merged.append((line_no, text))
    return [(n, t) for n, t in merged if len(t) >= min_chars and len(t) <= max_chars * 2]


def stdlib_source(root: str | os.PathLike | None = None, *, min_chars: int = 200, max_chars: int = 4000) -> SourceData:
    """Chunks of the Python standard library's own source (tests, encodings tables and bundled
    third-party code skipped). Records: ``text``, ``origin``."""
    base = Path(root) if root else stdlib_dir()
    if not base.is_dir():
        raise SourceMissing(f"Python standard library not found at {base}")
    records = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for line_no, chunk in chunk_python(text, min_chars=min_chars, max_chars=max_chars):
            records.append({"text": chunk, "origin": f"stdlib:{rel.as_posix()}:{line_no}"})
    info = SourceInfo(name="python-stdlib", license="PSF-2.0", location=str(base),
                      version=".".join(map(str, sys.version_info[:3])) if not root else None,
                      note="Python source of the running interpreter's standard library, chunked by "
                           "top-level def/class")
    return SourceData(info, records)
