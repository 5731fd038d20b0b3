"""CLI: ``sweep`` (run a calibration-mix x method x ratio grid) and ``report`` (fronts, tables, best point)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_json, emit, positive_int


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..sweep.report import write_report
    from ..sweep.run import run_sweep
    from ..sweep.spec import load_spec

    spec = load_spec(args.spec, write_best=args.write_best)
    out = args.out or str(Path("runs") / f"sweep-{Path(args.spec).stem}")
    try:
        summary = run_sweep(spec, out, jobs=args.jobs, max_points=args.max_points, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"moe-slim: sweep interrupted; every finished point is in {Path(out) / 'results.db'} "
              "(run the same command again to resume)", file=sys.stderr)
        return 130
    text = (f"{summary['ran']} points run, {summary['already_done']} already done, {summary['remaining']} remaining "
            f"({summary['seconds']:.0f}s); results in {summary['db']}")
    if not args.no_report:
        target = spec.write_best or args.target
        if target is None and spec.eval["tasks"] in (None, []) or "translation" in (spec.eval["tasks"] or []):
            target = "chrf>=0.98*baseline"
        rep = write_report(summary["db"], target=target)
        text += f"\n{rep['table']}\nreport: {rep['report']}"
        summary["report"] = _report_json(rep, target)
    emit(args, summary, text)
    return 0


def _report_json(rep: dict, target: str | None) -> dict:
    best = rep["best"]
    keep = ("key", "method", "kind", "mix", "ratio", "budget", "experts_kept", "experts_total", "params", "chrf",
            "mc_acc", "ppl", "target_threshold", "target_metric", "basis")
    return {"report": rep["report"], "target": target, "command": rep["command"],
            "best": {k: best.get(k) for k in keep} if best else None}


def cmd_report(args: argparse.Namespace) -> int:
    from ..sweep.report import target_line, write_report

    rep = write_report(args.results, args.out, target=args.target, plots=not args.no_plots,
                       overwrite=True if args.overwrite else None)
    lines = [rep["table"]]
    if args.target:
        best = rep["best"]
        if best is None:
            lines.append(f"\nno point's 95% interval clears {args.target}")
        else:
            lines += [f"\nbest for {args.target}: {best['method']} ratio {best['ratio']:g} mix {best['mix']} "
                      f"({best['experts_kept']}/{best['experts_total']} experts): {target_line(best)}",
                      f"  {rep['command']}"]
    lines.append(f"\nreport: {rep['report']}")
    emit(args, _report_json(rep, args.target), "\n".join(lines))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="evaluate a grid of calibration mixes x methods x ratios (resumable, SQLite)")
    p.add_argument("spec", help="sweep spec (YAML); see moe_slim.sweep.spec for the schema")
    p.add_argument("--out", help="sweep directory (results.db, stats/, report/); default runs/sweep-<spec name>")
    p.add_argument("--jobs", type=positive_int, default=1, help="points evaluated in parallel processes (default 1)")
    p.add_argument("--max-points", type=positive_int, help="stop after this many new points (re-run to continue)")
    p.add_argument("--write-best", metavar="TARGET",
                   help="after the sweep, write the checkpoint of the best point for TARGET to OUT/best")
    p.add_argument("--target", help="target for the report's best configuration (default chrf>=0.98*baseline "
                   "when the sweep evaluates translation)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json(p)
    p.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="Pareto fronts (PNG), tables (Markdown) and the best point of a sweep")
    r.add_argument("results", help="results.db of a sweep (or its directory)")
    r.add_argument("--out", help="report directory (default: report/ beside the database)")
    r.add_argument("--target", help='e.g. "chrf>=0.98*baseline" or "ppl<=1.1*baseline"')
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report at --out (the default place, report/ beside the database, is "
                        "always rewritten); only a report is ever replaced")
    add_json(r)
    r.set_defaults(func=cmd_report)
