"""Outputs appear atomically; inputs are never touched; a user's files are never replaced by accident.

Everything moe_slim writes (checkpoints, stats, plans, results, reports) goes through
:func:`atomic_dir` or :func:`atomic_file`: the content is written next to the destination under a
temporary name (``.NAME.tmp-PID-XXXX``), every file is fsynced, and it is renamed into place only
when complete, so a crash or a kill leaves the destination as it was. The next run into the same
place removes what a killed run left behind.

:func:`check_output` is the one guard every command applies before any work: an output may not be,
contain or lie inside any of the command's inputs (symlinks resolved), with or without
``--overwrite``; an existing output is replaced only with ``--overwrite`` and only when it is a
previous moe_slim output (see :func:`is_moe_slim_output`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import MoeSlimError

#: a file inside every directory moe_slim writes: what marks it as ours, so --overwrite may replace it
MARKER = ".moe_slim"
#: test-only: the name of a pause point (``after-first-file``, ``before-commit``...) at which the process
#: writes the file named by ``MOE_SLIM_TEST_PAUSE_FLAG`` and sleeps, so a test can kill it there
PAUSE_ENV, PAUSE_FLAG_ENV = "MOE_SLIM_TEST_PAUSE", "MOE_SLIM_TEST_PAUSE_FLAG"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pause_point(name: str) -> None:
    """Test hook: stop here (for up to a minute) when ``MOE_SLIM_TEST_PAUSE`` names this point."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    flag = os.environ.get(PAUSE_FLAG_ENV)
    if flag:
        Path(flag).write_text(str(os.getpid()))
    time.sleep(60)


def note(message: str) -> None:
    """A one-line notice on stderr that does not stop the command."""
    print(f"moe-slim: note: {message}", file=sys.stderr, flush=True)


def is_moe_slim_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is something moe_slim wrote: a directory with the marker file (or, from versions
    before the marker, stats, a data build, a sweep or a checkpoint with moe_slim's plan), a JSON
    results/plan file of ours, or a file inside a directory with the marker (a model card moe_slim
    rewrites in a checkpoint it trained)."""
    p = Path(path)
    if p.is_dir():
        if (p / MARKER).is_file():
            return True
        for name, key in (("meta.json", "format"), ("manifest.json", "format"), ("plan.json", "format")):
            if _json_field(p / name, key).startswith("moe_slim."):
                return True
        return (p / "results.db").is_file() or (p / "config.json").is_file() and '"moe_slim"' in _read(p / "config.json")
    if p.is_file():
        return (p.parent / MARKER).is_file() or any(_json_field(p, k).startswith("moe_slim") for k in ("kind", "format"))
    return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[:1_000_000]
    except OSError:
        return ""


def _json_field(path: Path, key: str) -> str:
    if not path.is_file() or path.stat().st_size > 50_000_000:
        return ""
    try:
        value = json.loads(_read(path)).get(key, "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def refuse_overlap(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> Path:
    """A one-line error when ``out`` is, contains or lies inside one of ``inputs`` (symlinks resolved);
    returns ``out`` resolved. For outputs that are meant to exist already (a sweep being resumed)."""
    target = Path(out).resolve()
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = Path(inp).resolve()
        if target == src:
            raise MoeSlimError(f"output {out} is the input {inp}; moe_slim never writes over its inputs "
                               "(choose another --out)")
        if src in target.parents:
            raise MoeSlimError(f"output {out} lies inside the input {inp}; write it somewhere else")
        if target in src.parents:
            raise MoeSlimError(f"output {out} contains the input {inp}; write it somewhere else")
    return target


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The guard every command applies to its output before any work; returns the path.

    Refuses, with one line: an output that is, contains or lies inside an input; a path under a
    regular file; an existing output without ``overwrite``; and, with ``overwrite``, an existing
    path that is not a previous moe_slim output.
    """
    out = Path(path)
    target = refuse_overlap(out, inputs)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoeSlimError(f"cannot write {out}: {parent} is a file, not a directory")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MoeSlimError(f"output {out} already exists (pass --overwrite to replace it)")
        if not is_moe_slim_output(out):
            raise MoeSlimError(f"{out} exists and is not a moe_slim output; --overwrite replaces only moe_slim's own "
                               "outputs (remove it yourself or choose another --out)")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> None:
    """Remove the temporary files of killed runs into ``out`` (named with their process id)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        if kind not in ("tmp", "old"):
            continue
        pid = rest.split("-")[0]
        if not pid.isdigit():  # from a version that did not name its process
            note(f"{p} was left by an interrupted run; remove it with: rm -r {p}")
            continue
        if int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            note(f"removed {p.name}, left in {p.parent} by a run that was killed")


def _fsync_tree(root: Path) -> None:
    paths = [root] if root.is_file() else [*sorted(root.rglob("*")), root]
    for p in paths:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _usual_file_modes(root: Path) -> None:
    """Give files written through temporary files (safetensors writes 0600) the usual read permissions."""
    mode = 0o666 & ~_umask()
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode | (f.stat().st_mode & 0o111 & ~_umask()))


def _wrap_os_error(out: Path, exc: OSError) -> MoeSlimError:
    return MoeSlimError(f"could not write {out}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block finishes without error."""
    out = check_output(path, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    except OSError as exc:
        raise _wrap_os_error(out, exc) from exc
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "moe_slim"}) + "\n")
        _usual_file_modes(tmp)
        _fsync_tree(tmp)
        pause_point("before-commit")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _wrap_os_error(out, exc) from exc
        raise


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to ``path`` when the block finishes."""
    out = check_output(path, overwrite)
    if out.is_dir():
        raise MoeSlimError(f"output {out} is a directory; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise _wrap_os_error(out, exc) from exc
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        pause_point("before-commit")
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _wrap_os_error(out, exc) from exc
        raise
