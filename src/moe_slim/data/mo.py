"""A small reader for GNU gettext ``.mo`` catalogs (no use of the :mod:`gettext` module).

Format (GNU gettext manual, "The Format of GNU MO Files")::

    offset  0  magic 0x950412de (written in the file's byte order)
    offset  4  file format revision (major << 16 | minor; major 0 or 1)
    offset  8  N, number of strings
    offset 12  O, offset of the table of original strings
    offset 16  T, offset of the table of translated strings
    offset 20  S, size of the hashing table      (ignored here)
    offset 24  H, offset of the hashing table    (ignored here)

Each table holds N (length, offset) pairs of 32-bit integers; a string is ``length`` bytes at
``offset`` (followed by a NUL that the length does not count). An original is
``[msgctxt "\\x04"] msgid ["\\0" msgid_plural]``; a translation is ``msgstr[0] ["\\0" msgstr[1]...]``.
The entry whose msgid is empty is the header; its ``Content-Type`` names the charset both the
originals and the translations are encoded in.

A malformed file raises :class:`~moe_slim.errors.MoeSlimError` (one line, naming the file).
"""

from __future__ import annotations

import codecs
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoeSlimError

MO_MAGIC = 0x950412DE
_HEADER_SIZE = 28
_CHARSET_RE = re.compile(r"charset\s*=\s*([A-Za-z0-9_.:\-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class MoMessage:
    """One catalog entry. ``msgstr`` has one item, or one per plural form."""

    msgid: str
    msgstr: tuple[str, ...]
    context: str | None = None
    msgid_plural: str | None = None

    @property
    def singular(self) -> str:
        """The translation of the singular form (``msgstr[0]``)."""
        return self.msgstr[0] if self.msgstr else ""


@dataclass
class MoCatalog:
    """A parsed catalog: its header fields, charset, byte order and messages (header excluded)."""

    path: str
    charset: str
    byte_order: str  # "little" or "big"
    revision: int
    headers: dict[str, str] = field(default_factory=dict)
    messages: list[MoMessage] = field(default_factory=list)

    @property
    def language(self) -> str | None:
        return self.headers.get("Language") or None

    def pairs(self) -> list[tuple[str, str]]:
        """(msgid, singular translation) for every translated message, contexts stripped."""
        return [(m.msgid, m.singular) for m in self.messages if m.msgid and m.singular]


def _parse_headers(text: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            headers[key.strip()] = value.strip()
    return headers


def _charset_of(header_text: str) -> str:
    match = _CHARSET_RE.search(header_text)
    if not match or match.group(1).upper() in {"CHARSET", ""}:
        return "utf-8"  # unfilled template header: GNU tools treat it as ASCII/UTF-8
    return match.group(1)


def parse_mo(data: bytes, name: str = "<bytes>") -> MoCatalog:
    """Parse the bytes of a ``.mo`` file. ``name`` only appears in error messages."""

    def bad(why: str) -> MoeSlimError:
        return MoeSlimError(f"{name} is not a valid .mo catalog: {why} (delete or reinstall the file)")

    if len(data) < _HEADER_SIZE:
        raise bad(f"only {len(data)} bytes")
    (magic_le,) = struct.unpack_from("<I", data, 0)
    if magic_le == MO_MAGIC:
        order, endian = "<", "little"
    elif struct.unpack_from(">I", data, 0)[0] == MO_MAGIC:
        order, endian = ">", "big"
    else:
        raise bad(f"bad magic number 0x{magic_le:08x}")
    revision, count, orig_off, trans_off = struct.unpack_from(order + "4I", data, 4)
    if revision >> 16 not in (0, 1):
        raise bad(f"unsupported format revision {revision >> 16}.{revision & 0xFFFF}")
    table_bytes = count * 8
    for what, off in (("original", orig_off), ("translation", trans_off)):
        if off + table_bytes > len(data):
            raise bad(f"{what} table ({count} entries at offset {off}) runs past the end of the file")

    def strings(off: int) -> list[bytes]:
        table = struct.unpack_from(f"{order}{2 * count}I", data, off)
        out = []
        size = len(data)
        for i in range(count):
            length, start = table[2 * i], table[2 * i + 1]
            if start + length > size:
                raise bad(f"string {i} (offset {start}, length {length}) runs past the end of the file")
            out.append(data[start:start + length])
        return out

    originals, translations = strings(orig_off), strings(trans_off)

    charset = "utf-8"
    headers: dict[str, str] = {}
    for orig, trans in zip(originals, translations):
        if orig == b"":
            header_text = trans.decode("ascii", errors="replace")
            charset = _charset_of(header_text)
            break
    try:
        codecs.lookup(charset)
    except LookupError:
        raise bad(f"unknown charset {charset!r} in the header") from None

    def decode(raw: bytes, what: str, i: int) -> str:
        try:
            return raw.decode(charset)
        except UnicodeDecodeError as exc:
            raise bad(f"{what} {i} is not valid {charset} ({exc.reason} at byte {exc.start})") from None

    messages: list[MoMessage] = []
    for i, (orig, trans) in enumerate(zip(originals, translations)):
        if orig == b"":
            headers = _parse_headers(decode(trans, "header", i))
            continue
        text = decode(orig, "msgid", i)
        context = None
        if "\x04" in text:
            context, text = text.split("\x04", 1)
        msgid, _, plural = text.partition("\x00")
        forms = tuple(decode(trans, "msgstr", i).split("\x00"))
        messages.append(MoMessage(msgid=msgid, msgstr=forms, context=context, msgid_plural=plural or None))
    return MoCatalog(path=name, charset=charset, byte_order=endian, revision=revision, headers=headers,
                     messages=messages)


def read_mo(path: str | os.PathLike) -> MoCatalog:
    """Read and parse a ``.mo`` file; a missing, unreadable or corrupt file is a MoeSlimError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise MoeSlimError(f"cannot read {p}: {exc.strerror or exc}") from None
    return parse_mo(data, name=str(p))

