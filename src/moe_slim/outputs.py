"""Outputs appear atomically; inputs are never touched.

Everything moe_slim writes (checkpoints, stats, plans, results) goes through :func:`atomic_dir`
or :func:`atomic_file`: the content is written next to the destination under a temporary name and
renamed into place only when complete, so a crash leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import MoeSlimError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output unless ``overwrite``; return the path."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise MoeSlimError(f"output {out} already exists (pass --overwrite to replace it)")
    return out


def _usual_file_modes(root: Path) -> None:
    """Give files written through temporary files (safetensors writes 0600) the usual read permissions."""
    mode = 0o666 & ~_umask()
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode | (f.stat().st_mode & 0o111 & ~_umask()))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block finishes without error."""
    out = check_output(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _usual_file_modes(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to ``path`` when the block finishes."""
    out = check_output(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if out.is_dir():
        raise MoeSlimError(f"output {out} is a directory; give a file path")
    os.replace(tmp, out)
