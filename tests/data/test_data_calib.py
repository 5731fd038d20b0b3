"""Calibration input: domain=file specs, directories, mix specs over a built data dir, hf:, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_slim.data.calib import Calibration, load_calibration
from moe_slim.errors import MoeSlimError


def _jsonl(path: Path, texts: list[str], **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """A minimal built data dir: <domain>/<split>.jsonl plus a manifest."""
    data = tmp_path / "data"
    for d in ("general", "math", "translation"):
        for s in ("calibration", "train", "validation", "test"):
            _jsonl(data / d / f"{s}.jsonl", [f"{d} {s} text {i}" for i in range(4)])
    (data / "manifest.json").write_text(json.dumps({"domains": {}}))
    return data


def test_domain_file_spec(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["one", "two"])
    b = _jsonl(tmp_path / "b.jsonl", ["drei"])
    cal = load_calibration(f"general={a},mydomain={b}")
    assert isinstance(cal, Calibration)
    assert dict(cal) == {"general": ["one", "two"], "mydomain": ["drei"]}
    assert cal.weights is None and cal.tokens is None
    cal = load_calibration(f"general={a},mydomain={b}@10k")
    assert cal.tokens == 10_000 and cal.token_budget() == {"general": 5000, "mydomain": 5000}


def test_mix_spec_over_built_data(built):
    cal = load_calibration("translation=3,general=1,math=0@1k", data_dir=built)
    assert cal.domains == ["translation", "general"]
    assert cal.texts["translation"][0] == "translation calibration text 0"
    assert cal.weights == {"translation": 0.75, "general": 0.25}
    assert cal.tokens == 1000
    taken = cal.take(lambda t: 100)
    assert len(taken["translation"]) == 4 and len(taken["general"]) == 3


def test_mix_spec_other_split_and_limit(built):
    cal = load_calibration("general=1", data_dir=built, split="test", limit=2)
    assert cal.texts == {"general": ["general test text 0", "general test text 1"]}


def test_yaml_mix_file(built, tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("weights: {math: 2, general: 2}\ntokens: 5k\n")
    cal = load_calibration(str(p), data_dir=built)
    assert cal.weights == {"math": 0.5, "general": 0.5} and cal.tokens == 5000


def test_built_directory(built):
    cal = load_calibration(str(built))
    assert set(cal) == {"general", "math", "translation"}
    assert cal.weights is None


def test_directory_of_domain_files(tmp_path):
    _jsonl(tmp_path / "c" / "legal.jsonl", ["a contract"])
    _jsonl(tmp_path / "c" / "code.jsonl", ["def f(): pass"])
    cal = load_calibration(str(tmp_path / "c"))
    assert dict(cal) == {"code": ["def f(): pass"], "legal": ["a contract"]}


def test_single_jsonl_file(tmp_path):
    cal = load_calibration(str(_jsonl(tmp_path / "medical.jsonl", ["x", "y"], id=1)))
    assert dict(cal) == {"medical": ["x", "y"]}


def _one_line_error(spec: str, part: str, **kw) -> None:
    with pytest.raises(MoeSlimError) as err:
        load_calibration(spec, **kw)
    msg = str(err.value)
    assert part in msg, msg
    assert "\n" not in msg


def test_empty_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _one_line_error(f"general={empty}", "is empty")


def test_jsonl_without_text_is_an_error(tmp_path):
    p = tmp_path / "notext.jsonl"
    p.write_text(json.dumps({"content": "hello"}) + "\n")
    _one_line_error(f"general={p}", "line 1 has no 'text'")


def test_bad_json_line_is_an_error(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", ["ok"])
    p.write_text(p.read_text() + "{not json\n")
    _one_line_error(f"general={p}", "line 2 is not valid JSON")


def test_missing_file_and_unknown_domain(tmp_path, built):
    _one_line_error(f"general={tmp_path / 'nope.jsonl'}", "not found")
    _one_line_error("code=1", "'code' has no calibration split", data_dir=built)
    _one_line_error("general=1", "does not exist", data_dir=tmp_path / "nodata")
    _one_line_error("general=1,math=x.jsonl", "mixes weights and files", data_dir=built)
    _one_line_error("general=0", "all zero", data_dir=built)
    _one_line_error("whatever", "not understood")
    _one_line_error(str(tmp_path / "no.yaml"), "not found")
    _one_line_error(str(tmp_path), "no <domain>.jsonl files")


def test_hf_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _one_line_error("hf:wikitext:wikitext-2-raw-v1:test", "offline")
    _one_line_error("general=hf:wikitext", "offline")
