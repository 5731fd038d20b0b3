"""Which gettext messages make useful translation pairs.

Software catalogs are full of templates (``%s``, ``{0}``, ``${var}``), markup, keyboard shortcuts,
option lists and one-word labels. A pair is kept only when both sides are plain one-line
sentences: the source has at least ``min_words`` words and neither side has a placeholder.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

MIN_WORDS = 4
MAX_CHARS = 400

_PLACEHOLDER_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # printf, incl. positional (%1$s), flags, width, precision, length, C99 <PRIu64>
    ("printf", re.compile(r"%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?"
                          r"(?:hh|h|ll|l|L|q|j|z|Z|t|I64|I32)?[diouxXeEfFgGaAcCsSpnm]")),
    ("printf", re.compile(r"%<PRI\w+>")),
    ("python %", re.compile(r"%\([^)]*\)")),
    ("numbered %", re.compile(r"%\d+")),              # Qt / KDE %1
    ("brace format", re.compile(r"\{[^{}\s]*\}")),      # {0} {name} {} {0:>5}
    ("shell variable", re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\$\d")),
    ("@var@", re.compile(r"@[A-Za-z_][A-Za-z0-9_]*@")),
)
_MARKUP = re.compile(r"<[^<>]*>|&[a-zA-Z]+;|&#\d+;")
_MNEMONIC = re.compile(r"(?:^|[\s(])[_&][^\s_&]")     # GTK "_Open", Qt "&Open"
_OPTION = re.compile(r"(?:^|\s)--?[A-Za-z]")          # command-line options in help texts
_URL = re.compile(r"https?://|www\.|\w@\w+\.")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LETTER = re.compile(r"[^\W\d_]")


def normalize_space(text: str) -> str:
    """Collapse runs of whitespace to one space and trim (NFC-normalised)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def placeholder_kind(text: str) -> str | None:
    """The kind of format placeholder in ``text`` (``"printf"``, ``"brace format"``...), or None."""
    t = text.replace("%%", "").replace("{{", "").replace("}}", "")
    for kind, pattern in _PLACEHOLDER_PATTERNS:
        if pattern.search(t):
            return kind
    return None


def _letter_ratio(text: str) -> float:
    letters = len(_LETTER.findall(text))
    return letters / max(1, len(text) - text.count(" "))


def reject_reason(src: str, ref: str, *, min_words: int = MIN_WORDS, max_chars: int = MAX_CHARS) -> str | None:
    """Why a (raw) gettext pair is not kept, or None when it is a usable sentence pair."""
    if not src.strip() or not ref.strip():
        return "empty"
    if len(src.split()) < min_words:
        return "too short"
    for side in (src, ref):
        if "\n" in side.strip() or "\t" in side or "\r" in side or _CONTROL.search(side.strip()):
            return "multi-line or control characters"
        if placeholder_kind(side):
            return "format template"
        if _MARKUP.search(side):
            return "markup"
        if _MNEMONIC.search(side):
            return "keyboard shortcut marker"
        if _URL.search(side):
            return "url or e-mail"
    s, r = normalize_space(src), normalize_space(ref)
    if _OPTION.search(s):
        return "command-line option"
    if len(s) > max_chars or len(r) > max_chars:
        return "too long"
    if s == r:
        return "untranslated"
    if _letter_ratio(s) < 0.7 or _letter_ratio(r) < 0.6:
        return "mostly symbols"
    ratio = len(r) / len(s)
    if not 0.4 <= ratio <= 3.0:
        return "length mismatch"
    return None


def clean_pair(src: str, ref: str, **kw) -> tuple[str, str] | None:
    """The whitespace-normalised pair, or None if :func:`reject_reason` rejects it."""
    if reject_reason(src, ref, **kw) is not None:
        return None
    return normalize_space(src), normalize_space(ref)


@dataclass(frozen=True)
class Pair:
    src: str
    ref: str
    lang: str
    origin: str


def dedupe_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """One pair per (source, language): the most frequent reference wins, ties go to the
    alphabetically first; its origin is the first catalog (sorted) that has it. Order-independent."""
    refs: dict[tuple[str, str], Counter[str]] = {}
    origins: dict[tuple[str, str, str], str] = {}
    for p in pairs:
        key = (p.src, p.lang)
        refs.setdefault(key, Counter())[p.ref] += 1
        okey = (p.src, p.lang, p.ref)
        if okey not in origins or p.origin < origins[okey]:
            origins[okey] = p.origin
    out = []
    for (src, lang), counts in sorted(refs.items()):
        ref = min(counts, key=lambda r: (-counts[r], r))
        out.append(Pair(src=src, ref=ref, lang=lang, origin=origins[(src, lang, ref)]))
    return out
