"""The .mo reader, on catalogs this file writes itself (both byte orders, charsets, plurals,
contexts, corruption)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mo_files import write_mo

from moe_slim.data.mo import parse_mo, read_mo
from moe_slim.errors import MoeSlimError

MESSAGES = {
    "Could not open the file for reading.": "Die Datei konnte nicht zum Lesen geöffnet werden.",
    "File\0Files": "Datei\0Dateien",
    "menu\x04Open the selected document now": "Das ausgewählte Dokument jetzt öffnen",
}


@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_both_byte_orders(byte_order):
    cat = parse_mo(write_mo(MESSAGES, byte_order=byte_order), name="x.mo")
    assert cat.byte_order == byte_order
    assert cat.charset == "UTF-8"
    assert cat.headers["Language"] == "de"
    pairs = dict(cat.pairs())
    assert pairs["Could not open the file for reading."] == "Die Datei konnte nicht zum Lesen geöffnet werden."


def test_plural_forms_use_the_singular_pair():
    cat = parse_mo(write_mo(MESSAGES))
    (msg,) = [m for m in cat.messages if m.msgid == "File"]
    assert msg.msgid_plural == "Files"
    assert msg.msgstr == ("Datei", "Dateien")
    assert dict(cat.pairs())["File"] == "Datei"


def test_context_is_stripped():
    cat = parse_mo(write_mo(MESSAGES))
    (msg,) = [m for m in cat.messages if m.context is not None]
    assert msg.context == "menu"
    assert msg.msgid == "Open the selected document now"
    assert "menu" not in "".join(k for k, _ in cat.pairs())


def test_non_utf8_charset_is_honoured():
    msgs = {"The café is closed on Mondays": "Das Café ist montags geschlossen, schön"}
    data = write_mo(msgs, charset="ISO-8859-1")
    assert "é".encode("latin-1") in data and "é".encode("utf-8") not in data
    cat = parse_mo(data)
    assert cat.charset == "ISO-8859-1"
    assert dict(cat.pairs()) == {"The café is closed on Mondays": "Das Café ist montags geschlossen, schön"}


def test_header_without_charset_defaults_to_utf8():
    cat = parse_mo(write_mo({"Grüße aus der Stadt": "Greetings"}, header="Project-Id-Version: x\n"))
    assert cat.charset == "utf-8"
    assert cat.pairs() == [("Grüße aus der Stadt", "Greetings")]


@pytest.mark.parametrize("data, why", [
    (b"", "only 0 bytes"),
    (b"\x00" * 40, "bad magic"),
    (write_mo(MESSAGES)[:60], "runs past the end"),
    (write_mo(MESSAGES, revision=7 << 16), "unsupported format revision"),
    (write_mo({"abc def": "ghi"}, header="Content-Type: text/plain; charset=NOPE-42\n"), "unknown charset"),
])
def test_corrupt_catalog_is_a_one_line_error(data, why):
    with pytest.raises(MoeSlimError) as err:
        parse_mo(data, name="broken.mo")
    msg = str(err.value)
    assert "broken.mo" in msg and why in msg and "\n" not in msg


def test_undecodable_string_is_a_one_line_error():
    data = write_mo({"abc def ghi jkl": "x"}).replace(b"abc def", b"ab\xff def")
    with pytest.raises(MoeSlimError, match="not valid UTF-8"):
        parse_mo(data, name="bad.mo")


def test_read_mo_missing_file(tmp_path):
    with pytest.raises(MoeSlimError, match="cannot read"):
        read_mo(tmp_path / "nope.mo")


def test_real_catalog_if_present():
    files = sorted(Path("/usr/share/locale/de/LC_MESSAGES").glob("*.mo"))[:5]
    if not files:
        pytest.skip("no German gettext catalogs installed in /usr/share/locale")
    for f in files:
        cat = read_mo(f)
        assert cat.messages
