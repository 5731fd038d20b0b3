"""Atomic outputs: appear whole, with the usual permissions."""

from __future__ import annotations

import os
import stat

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
