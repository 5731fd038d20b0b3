"""Translation pairs: EN->DE/FR/ES messages from the system's gettext ``.mo`` catalogs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ...errors import MoeSlimError
from ...prompts import TARGET_LANGS
from ..filters import Pair, clean_pair, dedupe_pairs
from ..mo import read_mo
from .base import SourceData, SourceInfo, SourceMissing, Warn, _no_warn
from .debian import DebCatalogs, is_held_out_catalog

# --------------------------------------------------------------------------------------------
# translation: gettext catalogs


DEFAULT_LOCALE_DIRS: tuple[str, ...] = ("/usr/share/locale", "/usr/share/locale-langpack", "/usr/local/share/locale")


def locale_catalogs(locale_dirs: Iterable[str | os.PathLike], langs: Iterable[str] = TARGET_LANGS) -> dict[str, list[Path]]:
    """The ``.mo`` files per language under ``<dir>/<lang>/LC_MESSAGES`` (and ``<lang>_<LANG>``,
    e.g. ``de_DE``), sorted by path. Catalogs reserved for the out-of-distribution evaluation
    (:data:`~moe_slim.data.sources.debian.HELD_OUT_CATALOGS`) are never listed."""
    out: dict[str, list[Path]] = {}
    for lang in langs:
        files: set[Path] = set()
        for d in locale_dirs:
            for sub in (lang, f"{lang}_{lang.upper()}"):
                msgdir = Path(d) / sub / "LC_MESSAGES"
                if msgdir.is_dir():
                    files.update(p for p in msgdir.glob("*.mo") if p.is_file() and not is_held_out_catalog(p))
        out[lang] = sorted(files)
    return out


def translation_source(locale_dirs: Iterable[str | os.PathLike] | None = None, langs: Iterable[str] = TARGET_LANGS,
                       *, min_words: int = 4, debs: Iterable[DebCatalogs] = (), warn: Warn = _no_warn) -> SourceData:
    """EN->lang sentence pairs from the installed gettext catalogs and those extracted from
    downloaded Debian packages (``debs``), filtered and deduplicated. Records: ``src``, ``ref``,
    ``tgt_lang``, ``origin`` (``<path>`` for installed catalogs, ``deb:<package>_<version>/<lang>/
    LC_MESSAGES/<catalog>.mo`` for downloaded ones). A corrupt catalog is skipped with a warning."""
    dirs = [Path(d) for d in (locale_dirs if locale_dirs is not None else DEFAULT_LOCALE_DIRS)]
    catalogs = locale_catalogs([d for d in dirs if d.is_dir()], langs)
    names = {p: str(p) for files in catalogs.values() for p in files}
    debs = list(debs)
    for deb in debs:
        for lang, files in locale_catalogs([deb.root], langs).items():
            catalogs[lang] = catalogs.get(lang, []) + files
            names.update({p: f"{deb.label}/{p.relative_to(deb.root).as_posix()}" for p in files})
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
                    pairs.append(Pair(src=kept[0], ref=kept[1], lang=lang, origin=names[path]))
    pairs = dedupe_pairs(pairs)
    records = [{"src": p.src, "ref": p.ref, "tgt_lang": p.lang, "origin": f"gettext:{p.origin}"} for p in pairs]
    n_files = sum(len(f) for f in catalogs.values())
    info = SourceInfo(
        name="gettext-catalogs",
        license="the licences of the Debian packages that ship each catalog (mostly GPL/LGPL; "
                "see /usr/share/doc/<package>/copyright)",
        location=", ".join([str(d) for d in dirs if d.is_dir()] + ([f"{len(debs)} Debian packages"] if debs else [])),
        note=f"{n_files} catalogs ({', '.join(f'{k}: {len(v)}' for k, v in catalogs.items())}), "
             f"{skipped} unreadable skipped; software messages (UI strings, error messages), not prose",
    )
    return SourceData(info, records)
