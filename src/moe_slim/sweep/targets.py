"""Targets such as ``chrf>=0.98*baseline``: parsing them, and choosing the point that meets one.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from ..errors import MoeSlimError

_TARGET = re.compile(r"^\s*([A-Za-z0-9_/+\-.]+)\s*(>=|<=)\s*(?:([0-9.eE+-]+)\s*\*\s*baseline|baseline|([0-9.eE+-]+))\s*$")
LOWER_IS_BETTER = {"ppl"}


def parse_target(text: str) -> tuple[str, str, float, bool]:
    """``chrf>=0.98*baseline`` -> ("chrf", ">=", 0.98, True); ``ppl<=40`` -> ("ppl", "<=", 40.0, False)."""
    m = _TARGET.match(text or "")
    if not m:
        raise MoeSlimError(f"target {text!r} is not METRIC>=VALUE or METRIC>=F*baseline (e.g. chrf>=0.98*baseline)")
    metric, op, factor, value = m.groups()
    try:
        if value is not None:
            return metric, op, float(value), False
        return metric, op, float(factor) if factor is not None else 1.0, True
    except ValueError:
        raise MoeSlimError(f"target {text!r}: {factor or value!r} is not a number") from None


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    if metric in row and metric not in ("metrics", "config"):
        v = row[metric]
    else:
        v = (row.get("metrics") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def baseline_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    for r in rows:
        if r["kind"] == "baseline":
            return r
    return None


def writable(row: dict[str, Any]) -> bool:
    """Whether the point can be written as a standard checkpoint (same expert count in every layer)."""
    return len(set(row.get("kept_per_layer") or [0])) == 1


def best_for_target(rows: list[dict[str, Any]], target: str, *, writable_only: bool = False) -> dict[str, Any] | None:
    """The point meeting ``target`` with the fewest experts kept (ties: fewer parameters, better metric).

    ``writable_only`` skips points with different expert counts per layer (global budgets), which
    live in memory only.
    """
    metric, op, value, relative = parse_target(target)
    if relative:
        base = baseline_row(rows)
        bv = metric_value(base, metric) if base else None
        if bv is None:
            raise MoeSlimError(f"target {target!r} is relative to the baseline, but the results have no baseline "
                               f"value of {metric}")
        value = value * bv
    ok = []
    for r in rows:
        if writable_only and not writable(r):
            continue
        v = metric_value(r, metric)
        if v is not None and (v >= value if op == ">=" else v <= value):
            ok.append((r, v))
    if not ok:
        return None
    sign = -1 if op == ">=" else 1
    ok.sort(key=lambda rv: (rv[0]["experts_kept"], rv[0]["params"], sign * rv[1]))
    best = dict(ok[0][0])
    best["target_threshold"] = value
    return best


def command_for(row: dict[str, Any], meta: dict[str, Any], out: str = "pruned/") -> str:
    """The command that writes ``row``'s checkpoint from the sweep's cached statistics (then its recovery)."""
    cmd = _slim_command(row, meta, out)
    rec = ((row.get("config") or {}).get("recover") or {}).get("sft")
    if rec and row["kind"] != "baseline":
        q = shlex.quote
        data = rec.get("data", "translation=0.8,general=0.2")
        if isinstance(data, dict):
            data = ",".join(f"{d}={w:g}" for d, w in data.items())
        flags = "".join(f" --{k.replace('_', '-')} {q(str(v))}" for k, v in rec.items() if k not in ("steps", "data"))
        cmd += (f" && moe-slim sft {q(out)} --data {q(str(data))} --steps {rec['steps']}{flags} "
                f"--data-dir {q(str(meta.get('data_dir', 'data')))} --merge-lora --out {q(out.rstrip('/') + '-sft/')}")
    return cmd


def _slim_command(row: dict[str, Any], meta: dict[str, Any], out: str) -> str:
    model, stats = meta.get("model", "MODEL"), meta.get("stats_dir", "STATS")
    cfg = row.get("config") or {}
    mix = ",".join(f"{d}={w:g}" for d, w in (cfg.get("mix") or {}).items())
    q = shlex.quote
    if row["kind"] == "baseline":
        return "(the unpruned model: nothing to write)"
    if row["kind"] == "merge":
        mc = cfg.get("merge") or {}
        return (f"moe-slim merge {q(model)} --stats {q(stats)} --method {row['method']} --ratio {row['ratio']:g} "
                f"--mix {q(mix)} --max-tokens {mc.get('max_tokens', 4096)} --align-tokens {mc.get('align_tokens', 2048)} "
                f"--group-size {mc.get('group_size', 16)} --seed {cfg.get('seed', 0)} --out {q(out)}")
    cmd = (f"moe-slim prune {q(model)} --stats {q(stats)} --criterion {row['method']} --ratio {row['ratio']:g} "
           f"--mix {q(mix)}")
    if row.get("budget") == "global":
        cmd += " --budget global" + (f" --floor {cfg['floor']}" if cfg.get("floor") else "")
        cmd += "  # global budgets keep different counts per layer: in-memory only, not writable as a checkpoint"
    if cfg.get("seed"):
        cmd += f" --seed {cfg['seed']}"
    return cmd + f" --out {q(out)}"
