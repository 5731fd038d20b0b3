"""Writing gettext .mo catalogs for tests (both byte orders, any charset)."""

from __future__ import annotations

import struct

from moe_slim.data.mo import MO_MAGIC


def write_mo(messages: dict[str, str], *, charset: str = "UTF-8", byte_order: str = "little",
             header: str | None = None, revision: int = 0) -> bytes:
    """A minimal GNU .mo writer: keys/values are raw msgid/msgstr (``"a\\0as"`` for plurals,
    ``"ctx\\x04a"`` for contexts). Adds a header entry naming ``charset``."""
    items = dict(messages)
    items.setdefault("", header if header is not None else
                     f"Project-Id-Version: test\nContent-Type: text/plain; charset={charset}\n"
                     "Content-Transfer-Encoding: 8bit\nLanguage: de\n")
    enc = [(k.encode(charset), v.encode(charset)) for k, v in items.items()]
    enc.sort(key=lambda kv: kv[0])
    order = "<" if byte_order == "little" else ">"
    n = len(enc)
    orig_off, trans_off = 28, 28 + 8 * n
    pos = trans_off + 8 * n
    blob = bytearray()
    otab, ttab = [], []
    for k, _ in enc:
        otab.append((len(k), pos + len(blob)))
        blob += k + b"\0"
    for _, v in enc:
        ttab.append((len(v), pos + len(blob)))
        blob += v + b"\0"
    out = struct.pack(order + "7I", MO_MAGIC, revision, n, orig_off, trans_off, 0, 0)
    out += b"".join(struct.pack(order + "2I", *e) for e in otab + ttab)
    return out + bytes(blob)
