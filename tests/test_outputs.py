"""Atomic outputs: appear whole, with the usual permissions."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from moe_slim.errors import MoeSlimError
from moe_slim.outputs import atomic_dir, atomic_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_gives_private_temp_files_the_usual_modes(tmp_path) -> None:
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        weights = tmp / "model.safetensors"
        weights.write_bytes(b"x")
        os.chmod(weights, 0o600)  # what a writer going through mkstemp leaves
        (tmp / "sub").mkdir()
        (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "sub" / "run.sh", 0o700)
        assert not out.exists()
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()
    assert stat.S_IMODE((out / "sub" / "run.sh").stat().st_mode) == (0o666 & ~_umask()) | 0o100  # exec bits kept
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()


def test_atomic_dir_writes_nothing_on_error(tmp_path) -> None:
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out):
        pass
    with pytest.raises(MoeSlimError):
        with atomic_dir(out):
            pass


def test_a_file_inside_a_directory_moe_slim_wrote_is_replaceable_and_elsewhere_is_not(tmp_path) -> None:
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "README.md").write_text("old card\n")
    with atomic_file(tmp_path / "ckpt" / "README.md", overwrite=True) as tmp:
        tmp.write_text("new card\n")
    assert (tmp_path / "ckpt" / "README.md").read_text() == "new card\n"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("the user's\n")
    with pytest.raises(MoeSlimError, match="not a moe_slim output"):
        with atomic_file(mine / "README.md", overwrite=True) as tmp:
            tmp.write_text("x")
    assert (mine / "README.md").read_text() == "the user's\n"


def test_the_kind_is_recorded_and_overwrite_replaces_only_the_same_kind(tmp_path) -> None:
    from moe_slim.outputs import output_kind

    with atomic_dir(tmp_path / "stats", kind="stats") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert output_kind(tmp_path / "stats") == "stats"
    with pytest.raises(MoeSlimError, match="is a router statistics directory; --overwrite replaces only a model"):
        with atomic_dir(tmp_path / "stats", overwrite=True, kind="checkpoint"):
            pass
    with atomic_dir(tmp_path / "stats", overwrite=True, kind="stats") as tmp:
        (tmp / "meta.json").write_text('{"new": 1}')
    assert (tmp_path / "stats" / "meta.json").read_text() == '{"new": 1}'


def test_a_file_named_results_db_does_not_make_a_directory_ours(tmp_path) -> None:
    import sqlite3

    from moe_slim.outputs import output_kind

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.db").write_text("my data")
    assert output_kind(mine) is None
    sweep = tmp_path / "old-sweep"  # a sweep of a version that wrote no marker: its database says what it is
    sweep.mkdir()
    with sqlite3.connect(sweep / "results.db") as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('format', '\"moe_slim.sweep/1\"')")
    conn.close()
    assert output_kind(sweep) == "sweep"


def test_an_output_that_appears_during_the_work_is_never_replaced(tmp_path) -> None:
    """The check before the work passes; another run writes the output meanwhile; the commit refuses."""
    out = tmp_path / "ckpt"
    for make in (lambda p: p.mkdir() or (p / "theirs").write_text("x"), lambda p: p.write_text("theirs")):
        with pytest.raises(MoeSlimError, match="appeared while this run was working"):
            with atomic_dir(out) as tmp:
                (tmp / "mine").write_text("y")
                make(out)
        assert sorted(q.name for q in tmp_path.iterdir()) == ["ckpt"]
        assert (out / "theirs").exists() if out.is_dir() else out.read_text() == "theirs"
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    with pytest.raises(MoeSlimError, match="appeared while this run was working"):
        with atomic_file(tmp_path / "r.json") as tmp:
            tmp.write_text("{}")
            (tmp_path / "r.json").write_text("theirs")
    assert (tmp_path / "r.json").read_text() == "theirs"


def test_a_resumable_directory_continues_only_its_own_kind(tmp_path) -> None:
    from moe_slim.outputs import open_resumable_dir

    empty = tmp_path / "empty"
    empty.mkdir()
    assert open_resumable_dir(empty, "sweep") == empty and (empty / ".moe_slim").is_file()
    open_resumable_dir(empty, "sweep")  # a second run continues it
    open_resumable_dir(tmp_path / "new", "sweep")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(MoeSlimError, match="a directory that moe_slim did not write"):
        open_resumable_dir(mine, "sweep")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_the_cache_is_never_the_data(tmp_path, monkeypatch) -> None:
    from moe_slim.outputs import cache_dir

    monkeypatch.setenv("MOE_SLIM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("MOE_SLIM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "moe_slim"
