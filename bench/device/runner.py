"""Running the device check's steps: a time limit each, one PASS/FAIL line each, figures collected.

Steps run in this one process (imports and CUDA start once; peak GPU memory is read per step with
``torch.cuda`` counters); a step that needs a launcher starts a subprocess. A step over its limit is
interrupted by SIGALRM; when the whole budget is spent the remaining steps are reported as SKIP, and
any FAIL or SKIP makes the exit status non-zero.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class StepFailed(Exception):
    """A check inside a step did not hold (its message is the FAIL line's reason)."""


class StepTimeout(BaseException):  # a BaseException: library code that catches Exception must not swallow it
    pass


@dataclass
class Result:
    step: str
    status: str  # PASS, FAIL or SKIP
    wall_s: float | None = None
    peak_gpu_mib: float | None = None
    tokens_per_s: float | None = None
    detail: str = ""


@dataclass
class Figures:
    """Everything measured, written as a few tab-separated files and one JSON into the figures folder."""

    out: Path
    results: list[Result] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _tsv(self.out / "steps.tsv", [r.__dict__ for r in self.results],
             ["step", "status", "wall_s", "peak_gpu_mib", "tokens_per_s", "detail"])
        _tsv(self.out / "compare.tsv", self.comparisons, ["comparison", "field", "max_abs", "rel", "agreement"])
        _tsv(self.out / "speed.tsv", self.speed, ["work", "device_s", "cpu_s", "device_over_cpu_speed"])
        (self.out / "environment.json").write_text(json.dumps(self.environment, indent=2, default=str) + "\n")
        (self.out / "summary.txt").write_text("".join(_line(r) + "\n" for r in self.results))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _tsv(path: Path, rows: list[dict[str, Any]], cols: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in cols])


def _line(r: Result) -> str:
    figs = [f"{r.wall_s:.1f} s" if r.wall_s is not None else None,
            f"peak GPU {r.peak_gpu_mib:.0f} MiB" if r.peak_gpu_mib is not None else None,
            f"{r.tokens_per_s:.0f} tok/s" if r.tokens_per_s is not None else None]
    figs_text = ", ".join(f for f in figs if f)
    return f"{r.status} {r.step}" + (f" ({figs_text})" if figs_text else "") + (f": {r.detail}" if r.detail else "")


def _alarm(_signum: int, _frame: Any) -> None:
    raise StepTimeout


class Runner:
    """Runs steps in order within ``budget_s`` seconds, printing one line per step as it ends."""

    def __init__(self, figures: Figures, budget_s: float, log: Any = sys.stderr, limit_scale: float = 1.0) -> None:
        self.figures, self.budget_s, self.log, self.limit_scale = figures, budget_s, log, limit_scale
        self.t0 = time.monotonic()
        signal.signal(signal.SIGALRM, _alarm)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, name: str, limit_s: float, fn: Callable[[], dict[str, Any] | None]) -> Result:
        """Run ``fn`` (returns extra figures: tokens_per_s, detail, peak_gpu_mib) under a time limit."""
        limit = min(limit_s * self.limit_scale, self.left())
        if limit < 1:
            return self._done(Result(name, "SKIP", detail="budget of the whole check spent"))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            extra = fn() or {}
            signal.setitimer(signal.ITIMER_REAL, 0)
            res = Result(name, "PASS", detail=str(extra.get("detail", "")))
            res.tokens_per_s = extra.get("tokens_per_s")
        except StepTimeout:
            res, extra = Result(name, "FAIL", detail=f"over its limit of {limit:.0f} s"), {}
        except StepFailed as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            res, extra = Result(name, "FAIL", detail=str(exc)), {}
        except Exception as exc:  # a crash is a failure of this step, not of the check
            signal.setitimer(signal.ITIMER_REAL, 0)
            traceback.print_exc(file=self.log)
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            res, extra = Result(name, "FAIL", detail=f"{type(exc).__name__}: {first}"), {}
        res.wall_s = time.perf_counter() - t
        if res.status == "PASS":
            res.peak_gpu_mib = extra.get("peak_gpu_mib", torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return self._done(res)

    def _done(self, res: Result) -> Result:
        self.figures.results.append(res)
        print(_line(res), flush=True)
        self.figures.write()  # written after every step: a killed run still leaves its figures
        return res

    def failed(self) -> bool:
        return any(r.status != "PASS" for r in self.figures.results)


def cli(argv: list[str], log: Any = sys.stderr) -> dict[str, Any]:
    """Run ``moe-slim ARGV --json`` in this process; its JSON result, or StepFailed with its error line."""
    from moe_slim.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--json"])
    log.write(f"$ moe-slim {' '.join(argv)}\n{err.getvalue()[-4000:]}")
    if rc != 0:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise StepFailed(f"exit {rc}: {lines[-1] if lines else '(no message)'}")
    return json.loads(out.getvalue())
