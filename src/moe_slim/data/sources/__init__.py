"""One function per text source, one module per domain. Everything is read from the local machine, except the Debian packages :mod:`.debian` downloads.

Each function returns a :class:`SourceData` (what it is, its licence, where it came from, and raw
records) or raises :class:`SourceMissing` with a one-line message that names what to install.
Raw records are plain dicts; :mod:`moe_slim.data.build` turns them into the final records.
"""

from .base import SourceData, SourceInfo, SourceMissing, Warn
from .code import chunk_python, stdlib_dir, stdlib_source
from .debian import (
    DEBIAN_PACKAGES,
    HELD_OUT_CATALOGS,
    HELD_OUT_PACKAGES,
    DebCatalogs,
    check_packages,
    default_cache_dir,
    fetch_debian_catalogs,
    is_held_out_catalog,
)
from .general import (
    chunk_paragraphs,
    find_plays,
    find_python_docs,
    fortunes_source,
    parse_fortunes,
    plays_source,
    python_docs_source,
)
from .math import champ_source, gsm_symbolic_source, split_gsm_answer
from .translation import DEFAULT_LOCALE_DIRS, locale_catalogs, translation_source

__all__ = [
    "DEBIAN_PACKAGES", "HELD_OUT_CATALOGS", "HELD_OUT_PACKAGES", "DebCatalogs", "check_packages", "default_cache_dir",
    "fetch_debian_catalogs", "is_held_out_catalog",
    "DEFAULT_LOCALE_DIRS", "SourceData", "SourceInfo", "SourceMissing", "Warn", "champ_source", "chunk_paragraphs",
    "chunk_python", "find_plays", "find_python_docs", "fortunes_source", "gsm_symbolic_source", "locale_catalogs",
    "parse_fortunes", "plays_source", "python_docs_source", "split_gsm_answer", "stdlib_dir", "stdlib_source",
    "translation_source",
]
