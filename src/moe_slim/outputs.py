"""The one output rule: outputs appear atomically, inputs are never touched, nothing of the user's is replaced.

Everything moe_slim writes (checkpoints, stats, plans, results, reports) goes through
:func:`atomic_dir` or :func:`atomic_file`: the content is written next to the destination under a
temporary name (``.NAME.tmp-PID-XXXX``), every file is fsynced, and it is moved into place only
when complete, so a crash or a kill leaves the destination as it was. The next run into the same
place removes what a killed run left behind.

The rule, checked before any work (:func:`check_output`) and again at the moment of moving into
place: an output may not be, contain or lie inside an input (symlinks resolved); its location must
be writable; a new output is created exclusively (a rename onto a path that appeared meanwhile
fails, a file is linked as with ``O_EXCL``); an existing one is replaced only with ``--overwrite``
and only when it is a moe_slim output of the same kind (:data:`KINDS`, recorded in the marker
file): never a directory or file of the user's, never the reference model but by train-reference.
A directory filled over several runs (a sweep) is opened with :func:`open_resumable_dir`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import MoeSlimError

#: a file inside every directory moe_slim writes: what marks it as ours, and which kind of output it is
MARKER = ".moe_slim"
#: every kind of output and what it is; ``--overwrite`` replaces an output only with one of the same kind
KINDS: dict[str, str] = {
    "checkpoint": "a model checkpoint",
    "reference": "a reference model (as the shipped models/reference)",
    "stats": "a router statistics directory",
    "plan": "an expert plan directory",
    "probe": "a ProbScale probe directory",
    "data": "a data build",
    "sweep": "a sweep directory",
    "report": "a sweep report",
    "results": "an evaluation results file",
    "member": "a file inside a moe_slim output",
}
#: kinds written as single files (:func:`atomic_file`)
FILE_KINDS = ("results", "member")
#: the cache directory (:func:`cache_dir`) when set
CACHE_ENV = "MOE_SLIM_CACHE"
#: test-only: the name of a pause point (``after-first-file``, ``before-commit``...) at which the process
#: writes the file named by ``MOE_SLIM_TEST_PAUSE_FLAG`` and waits, so a test can kill or release it there
PAUSE_ENV, PAUSE_FLAG_ENV = "MOE_SLIM_TEST_PAUSE", "MOE_SLIM_TEST_PAUSE_FLAG"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pause_point(name: str) -> None:
    """Test hook: when ``MOE_SLIM_TEST_PAUSE`` names this point, write the file ``MOE_SLIM_TEST_PAUSE_FLAG``
    and wait (up to a minute) until the test removes it, or kills the process."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    flag = os.environ.get(PAUSE_FLAG_ENV)
    if flag:
        Path(flag).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not flag or Path(flag).exists()):
        time.sleep(0.02)


def note(message: str) -> None:
    """A one-line notice on stderr that does not stop the command."""
    print(f"moe-slim: note: {message}", file=sys.stderr, flush=True)


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of moe_slim output at ``path`` (one of :data:`KINDS`), or None when moe_slim did not write it.

    A directory is ours when it holds the marker; the marker names the kind (markers of versions
    before kinds: the kind is read off the content, or ``"unknown"``). A file is ours when it is a
    JSON results file of ours (``"results"``) or lies in a directory with the marker (``"member"``:
    a model card rewritten in a checkpoint). Nothing else is ours, whatever names it holds."""
    p = Path(path)
    if p.is_symlink():
        return None
    if p.is_dir():
        marker = p / MARKER
        if not marker.is_file():  # a sweep of a version that marked only its database
            return "sweep" if is_sweep_db(p / "results.db") else None
        kind = _json_field(marker, "kind")
        return kind if kind in KINDS else _legacy_kind(p)
    if p.is_file():
        if _json_field(p, "kind") == "moe_slim.eval":
            return "results"
        return "member" if (p.parent / MARKER).is_file() else None
    return None


def _legacy_kind(p: Path) -> str:
    """The kind of a directory with a marker that does not name it (written before kinds)."""
    fmt = {name: _json_field(p / name, "format") for name in ("meta.json", "manifest.json", "plan.json")}
    if fmt["meta.json"].startswith("moe_slim.stats"):
        return "stats"
    if fmt["manifest.json"].startswith("moe_slim.data"):
        return "data"
    if (p / "training.json").is_file() and (p / "config.json").is_file():
        return "reference"
    if (p / "config.json").is_file():
        return "checkpoint"
    if (p / "probe_matrix.json").is_file():
        return "probe"
    if fmt["plan.json"].startswith("moe_slim."):
        return "plan"
    if (p / "report.md").is_file():
        return "report"
    return "sweep" if is_sweep_db(p / "results.db") else "unknown"


def is_sweep_db(path: Path) -> bool:
    """Whether ``path`` is a sweep's SQLite database (its meta table says so), not just a file of that name."""
    if not path.is_file():
        return False
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except sqlite3.Error:
        return False
    return bool(row) and "moe_slim.sweep" in str(row[0])


def is_moe_slim_output(path: str | os.PathLike) -> bool:
    """Whether moe_slim wrote ``path`` (see :func:`output_kind`)."""
    return output_kind(path) is not None


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
    returns ``out`` resolved."""
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


def check_writable(out: Path) -> None:
    """A one-line error, before any work, when ``out`` could not be created: its nearest existing parent is
    a file, is not writable, or lies on a read-only file system. Nothing is written to find out."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoeSlimError(f"cannot write {out}: {parent} is a file, not a directory")
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise MoeSlimError(f"cannot write {out}: {parent} is on a read-only file system")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoeSlimError(f"cannot write {out}: {parent} is not writable")


def may_replace(out: Path, kind: str) -> None:
    """The overwrite rule: a one-line error unless ``out`` is a moe_slim output of ``kind`` (the same kind
    of thing this command writes). Applied before the work and again at the moment of replacing."""
    if out.is_symlink():
        raise MoeSlimError(f"{out} is a symbolic link; --overwrite replaces only what moe_slim wrote there itself "
                           f"(give the link's target, {out.resolve()}, or remove the link)")
    have = output_kind(out)
    if have is None:
        raise MoeSlimError(f"{out} exists and is not a moe_slim output; --overwrite replaces only moe_slim's own "
                           "outputs (remove it yourself or choose another --out)")
    if have == "member" and kind not in FILE_KINDS:
        raise MoeSlimError(f"{out} is a file inside a moe_slim output; give a new path")
    if have != kind and have != "member":
        what = KINDS.get(have, "an output of a kind this version does not know")
        shipped = " that only train-reference replaces" if have == "reference" else ""
        raise MoeSlimError(f"{out} is {what}{shipped}; --overwrite replaces only {KINDS[kind]}, the kind this "
                           "command writes (choose another --out)")


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = (), *, kind: str) -> Path:
    """The guard every command applies to its output before any work; returns the path.

    Refuses, with one line: an output that is, contains or lies inside an input; a location that
    cannot be written; an existing output without ``overwrite``; and, with ``overwrite``, anything
    but a previous moe_slim output of the same ``kind`` (:func:`may_replace`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(path)
    refuse_overlap(out, inputs)
    check_writable(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MoeSlimError(f"output {out} already exists (pass --overwrite to replace it)")
        may_replace(out, kind)
    return out


def check_resumable_dir(path: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The rule for a directory that a command fills over several runs (a sweep): it may be new, empty, or
    an output of ``kind`` to continue; anything else (a directory of the user's, another kind of output)
    is refused in one line. Checks only; :func:`open_resumable_dir` creates it."""
    out = Path(path)
    refuse_overlap(out, inputs)
    check_writable(out)
    if out.exists() and not out.is_dir():
        raise MoeSlimError(f"output {out} exists and is not a directory (choose another --out)")
    have = output_kind(out) if out.is_dir() else kind
    if have != kind and any(out.iterdir()):
        what = KINDS.get(have or "", "an output of another kind") if have else "a directory that moe_slim did not write"
        raise MoeSlimError(f"{out} is {what}, not {KINDS[kind]}; moe_slim continues only its own {kind} "
                           "directories (choose another --out)")
    return out


def open_resumable_dir(path: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """:func:`check_resumable_dir`, then the directory created (``mkdir``) with its marker, or reused."""
    out = check_resumable_dir(path, kind, inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if _json_field(out / MARKER, "kind") != kind:
            _write_marker(out, kind)
    except OSError as exc:
        raise _wrap_os_error(out, exc) from exc
    return out


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where derived data is cached, never inside an input: ``override`` (``--cache-dir``), else
    ``$MOE_SLIM_CACHE``, else ``~/.cache/moe_slim``."""
    if override is not None:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "moe_slim"


def _write_marker(d: Path, kind: str) -> None:
    (d / MARKER).write_text(json.dumps({"written_by": "moe_slim", "kind": kind}) + "\n")


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


def _as_write_error(out: Path, exc: BaseException) -> BaseException | None:
    """A failed write said in one line: an ``OSError``, or safetensors' own error type for the same (a full
    disk during ``save_file`` is a ``SafetensorError``, not an ``OSError``). None for anything else."""
    if isinstance(exc, OSError):
        return _wrap_os_error(out, exc)
    if type(exc).__name__ == "SafetensorError":  # "Error while serializing: I/O error: No space left on device"
        reason = re.split(r"(?i)error: ", str(exc).splitlines()[0])[-1].split(" (os error")[0]
        return MoeSlimError(f"could not write {out}: {reason.strip().rstrip('.')}")
    return None


def _appeared(out: Path) -> MoeSlimError:
    return MoeSlimError(f"output {out} appeared while this run was working (another run wrote it); nothing was "
                        "replaced (pass --overwrite to replace it)")


def _commit_dir(tmp: Path, out: Path, overwrite: bool, kind: str) -> None:
    """Rename ``tmp`` to ``out``, re-checking the rule now (another run may have written ``out`` meanwhile).
    Without ``overwrite`` the rename itself is exclusive: it fails when ``out`` exists and is not empty."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise _appeared(out)
        may_replace(out, kind)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(out) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, kind: str = "checkpoint") -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block finishes without error; the marker
    inside records ``kind``. The output rule is checked before (:func:`check_output`) and at the commit."""
    out = check_output(path, overwrite, kind=kind)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    except OSError as exc:
        raise _wrap_os_error(out, exc) from exc
    try:
        yield tmp
        _write_marker(tmp, kind)
        _usual_file_modes(tmp)
        _fsync_tree(tmp)
        pause_point("before-commit")
        _commit_dir(tmp, out, overwrite, kind)
        _fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        said = _as_write_error(out, exc)
        if said is not None:
            raise said from exc
        raise


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, kind: str = "results") -> Iterator[Path]:
    """Yield a temporary file path that becomes ``path`` when the block finishes: linked into place (exclusive:
    fails when ``path`` exists) or, with ``overwrite``, renamed over an output of the same kind."""
    if kind not in FILE_KINDS:
        raise ValueError(f"{kind!r} is not a kind of file output")
    out = check_output(path, overwrite, kind=kind)
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
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise _appeared(out)
            may_replace(out, kind)
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # exclusive, as O_EXCL: never replaces a file that appeared meanwhile
            except FileExistsError:
                raise _appeared(out) from None
            tmp.unlink()
        _fsync_dir(out.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        said = _as_write_error(out, exc)
        if said is not None:
            raise said from exc
        raise
