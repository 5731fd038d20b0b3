"""What every source returns: its items, provenance and licence; and how a missing source says so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

Warn = Callable[[str], None]
#: the largest archive member a source reads (locale tarballs, .deb catalogs); no real one comes near it, and a
#: crafted archive that expands a few MB into GBs is never read whole
MAX_MEMBER_BYTES = 8 << 20


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
