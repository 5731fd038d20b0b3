"""Catalogs from Debian packages (offline: a .deb built here, already in the cache), the held-out
packages and catalogs, catalog-level splits, and the input guard of the data build."""

from __future__ import annotations

import random
import shutil
import string
import subprocess
from pathlib import Path

import pytest
from mo_files import write_mo

from moe_slim.data.build import BuildOptions, build_data, catalog_name
from moe_slim.data.formats import CATALOG_SPLITS, SPLITS
from moe_slim.data.jsonl import load_split
from moe_slim.data.sources import (
    DEBIAN_PACKAGES,
    HELD_OUT_PACKAGES,
    check_packages,
    fetch_debian_catalogs,
    locale_catalogs,
    translation_source,
)
from moe_slim.data.splits import hold_out_catalogs, normalize_text
from moe_slim.errors import MoeSlimError


def _messages(catalog: str, n: int) -> dict[str, str]:
    """``n`` messages of random words, no two near-duplicates of each other (nor across catalogs)."""
    rng = random.Random(catalog)

    def words(k: int) -> str:
        return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9)))
                        for _ in range(k))
    return {words(6): words(6) for _ in range(n)}


def _locale(root: Path, catalogs: dict[str, int], langs=("de", "fr", "es")) -> Path:
    for lang in langs:
        d = root / lang / "LC_MESSAGES"
        d.mkdir(parents=True, exist_ok=True)
        for name, n in catalogs.items():
            (d / f"{name}.mo").write_bytes(write_mo(_messages(name, n)))
    return root


def test_held_out_packages_are_refused_by_name():
    assert not set(HELD_OUT_PACKAGES) & set(DEBIAN_PACKAGES)
    for name in ("nano", "vim-runtime"):
        with pytest.raises(MoeSlimError, match="reserved for the out-of-distribution") as err:
            check_packages(["coreutils", name])
        assert "\n" not in str(err.value)
        with pytest.raises(MoeSlimError, match="reserved"):
            BuildOptions(debian_packages=("tar", name)).validate()
    assert check_packages(["tar", "coreutils", "tar"]) == ("coreutils", "tar")


def test_held_out_catalogs_are_dropped_from_any_locale_dir(tmp_path):
    loc = _locale(tmp_path / "locale", {"app": 12, "nano": 12, "gawk": 12, "cpio": 12, "vim": 12})
    found = locale_catalogs([loc])
    assert {p.stem for files in found.values() for p in files} == {"app"}
    recs = translation_source([loc]).records
    assert len(recs) == 36 and all(Path(r["origin"]).stem == "app" for r in recs)


def _deb(tmp: Path, package: str, catalogs: dict[str, int]) -> Path:
    root = tmp / f"pkg-{package}"
    _locale(root / "usr" / "share" / "locale", catalogs)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n test\n")
    out = tmp / f"{package}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_cached_debs_are_extracted_and_read_offline(tmp_path):
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    _deb(cache / "debs", "toolbox", {"toolbox": 10, "nano": 10})
    warnings: list[str] = []
    debs = fetch_debian_catalogs(["toolbox", "absent-pkg"], cache, download=False, warn=warnings.append)
    assert [(d.package, d.version) for d in debs] == [("toolbox", "1.0-1")]
    assert len(debs[0].sha256) == 64 and any("absent-pkg" in w for w in warnings)
    assert sorted(p.name for p in debs[0].root.rglob("*.mo")) == ["nano.mo"] * 3 + ["toolbox.mo"] * 3
    recs = translation_source([tmp_path / "none"], debs=debs).records
    assert len(recs) == 30
    assert {r["origin"] for r in recs} >= {"gettext:deb:toolbox_1.0-1/de/LC_MESSAGES/toolbox.mo"}
    assert not any("nano" in r["origin"] for r in recs)
    again = fetch_debian_catalogs(["toolbox"], cache, download=False)
    assert again == debs


def _records(catalogs: dict[str, int]) -> list[dict]:
    out = []
    for name, n in catalogs.items():
        for src in _messages(name, n):
            out.append({"id": f"{name}-{src}", "origin": f"gettext:/x/de/LC_MESSAGES/{name}.mo", "src": src})
    return out


def test_hold_out_catalogs_keeps_whole_catalogs_and_no_shared_text():
    cats = {f"cat{i:02d}": 10 + i for i in range(30)}
    recs = _records(cats)
    shared = dict(recs[0])   # a text of cat00 also in cat01: never held out
    shared.update(id="zz-shared", origin="gettext:/x/de/LC_MESSAGES/cat01.mo")
    recs.append(shared)
    held, rest, chosen = hold_out_catalogs(recs, seed=3, fraction=0.1, catalog=catalog_name,
                                           key=lambda r: r["src"], names=CATALOG_SPLITS)
    assert all(chosen[s] for s in CATALOG_SPLITS) and not set(chosen[CATALOG_SPLITS[0]]) & set(chosen[CATALOG_SPLITS[1]])
    for split in CATALOG_SPLITS:
        assert {catalog_name(r) for r in held[split]} <= set(chosen[split])
        assert 0.05 * len(recs) < len(held[split]) < 0.2 * len(recs)
    rest_keys = {normalize_text(r["src"]) for r in rest}
    assert not any(normalize_text(r["src"]) in rest_keys for s in CATALOG_SPLITS for r in held[s])
    assert sum(len(v) for v in held.values()) + len(rest) == len(recs)
    assert hold_out_catalogs(list(reversed(recs)), seed=3, fraction=0.1, catalog=catalog_name,
                             key=lambda r: r["src"], names=CATALOG_SPLITS) == (held, rest, chosen)


def test_build_writes_catalog_splits_and_guards_its_inputs(tmp_path):
    loc = _locale(tmp_path / "locale", {f"cat{i:02d}": 8 + i for i in range(25)})
    opts = BuildOptions(seed=0, domains=("translation",), locale_dirs=(str(loc),), catalog_fraction=0.08)
    out = tmp_path / "data"
    m = build_data(out, opts)
    t = m["domains"]["translation"]
    held = {s: load_split(out, "translation", s) for s in CATALOG_SPLITS}
    assert all(held[s] for s in CATALOG_SPLITS)
    for s in CATALOG_SPLITS:
        assert t["counts"][s] == len(held[s]) == t["catalog_splits"][s]["records"]
        assert {catalog_name(r) for r in held[s]} <= set(t["catalog_splits"][s]["catalogs"])
    seen = {catalog_name(r) for s in SPLITS for r in load_split(out, "translation", s)}
    assert not seen & {catalog_name(r) for s in CATALOG_SPLITS for r in held[s]}
    with pytest.raises(MoeSlimError, match="lies inside the input"):
        build_data(loc / "data", opts)
    assert not (loc / "data").exists()
