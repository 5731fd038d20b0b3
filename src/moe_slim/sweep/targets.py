"""Targets such as ``chrf>=0.98*baseline``: parsing them, and choosing the point that meets one.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from ..errors import MoeSlimError


def merge_choices(stored: dict[str, Any]) -> dict[str, Any]:
    """A sweep's stored merge settings as :class:`~moe_slim.experts.merge.config.MergeOptions` fields (unset dropped)."""
    return {k: v for k, v in stored.items() if v is not None and k not in ("method", "preset")}

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


def mc_interval(row: dict[str, Any]) -> tuple[float, float] | None:
    """95% interval of the mean multiple-choice accuracy over tasks (normal approximation, items per task)."""
    m = row.get("metrics") or {}
    tasks = [k[: -len("/acc")] for k in m if k.endswith("/acc") and k.count("/") == 1
             and f"{k[: -len('/acc')]}/n" in m]
    if not tasks:
        return None
    accs = [float(m[f"{t}/acc"]) for t in tasks]
    var = sum(a * (1 - a) / max(float(m[f"{t}/n"]), 1.0) for a, t in zip(accs, tasks)) / len(tasks) ** 2
    mean, half = sum(accs) / len(accs), 1.96 * var ** 0.5
    return max(0.0, mean - half), min(1.0, mean + half)


def interval(row: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """The row's 95% interval of ``metric`` when it has one (chrF: paired bootstrap; MC accuracy)."""
    m = row.get("metrics") or {}
    if metric in ("chrf", "translation/chrf") and "translation/chrf_lo" in m:
        return float(m["translation/chrf_lo"]), float(m["translation/chrf_hi"])
    if metric == "mc_acc":
        return mc_interval(row)
    return None


def delta_interval(row: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of the row's difference from the baseline (chrF)."""
    m = row.get("metrics") or {}
    if metric in ("chrf", "translation/chrf") and "translation/chrf_delta_lo" in m:
        return float(m["translation/chrf_delta_lo"]), float(m["translation/chrf_delta_hi"])
    return None


def _clears(row: dict[str, Any], metric: str, op: str, threshold: float, base_value: float | None,
            relative: bool) -> bool | None:
    """Whether the row's interval lies on the right side of ``threshold`` (None: the row has no interval)."""
    if row["kind"] == "baseline":
        v = metric_value(row, metric)
        return v is not None and (v >= threshold if op == ">=" else v <= threshold)
    if relative and base_value is not None:
        d = delta_interval(row, metric)
        if d is not None:
            return d[0] >= threshold - base_value if op == ">=" else d[1] <= threshold - base_value
    ci = interval(row, metric)
    if ci is None:
        return None
    return ci[0] >= threshold if op == ">=" else ci[1] <= threshold


def best_for_target(rows: list[dict[str, Any]], target: str, *, writable_only: bool = False) -> dict[str, Any] | None:
    """The point meeting ``target`` with the fewest experts kept (ties: fewer parameters, better metric).

    A point meets the target only when its 95% interval clears it: for ``chrf>=F*baseline`` the
    paired-bootstrap interval of its difference from the baseline, for absolute chrF and MC accuracy
    targets its own interval. Only when no point has an interval of the metric (perplexity, or a
    custom evaluator) are point estimates compared; ``best["basis"]`` says which. ``writable_only``
    skips points with different expert counts per layer (global budgets), which live in memory only.
    """
    metric, op, value, relative = parse_target(target)
    base = baseline_row(rows)
    bv = metric_value(base, metric) if base else None
    if relative:
        if bv is None:
            raise MoeSlimError(f"target {target!r} is relative to the baseline, but the results have no baseline "
                               f"value of {metric}")
        value = value * bv
    candidates = [r for r in rows if not (writable_only and not writable(r))]
    verdicts = {id(r): _clears(r, metric, op, value, bv, relative) for r in candidates}
    with_interval = any(v is not None for r, v in ((r, verdicts[id(r)]) for r in candidates) if r["kind"] != "baseline")
    ok = []
    for r in candidates:
        v = metric_value(r, metric)
        if v is None:
            continue
        verdict = verdicts[id(r)]
        if verdict is None and with_interval:
            continue  # others carry intervals: a bare estimate is no evidence
        if verdict or (verdict is None and (v >= value if op == ">=" else v <= value)):
            ok.append((r, v))
    if not ok:
        return None
    sign = -1 if op == ">=" else 1
    ok.sort(key=lambda rv: (rv[0]["experts_kept"], rv[0]["params"], sign * rv[1]))
    best = dict(ok[0][0])
    best["target_threshold"] = value
    best["target_metric"] = metric
    best["basis"] = "95% interval" if with_interval else "point estimate (no interval for this metric)"
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
        if rec.get("loss", "ce") != "ce":  # teacher: source, the model the sweep pruned
            flags += f" --teacher {q(str(meta.get('model', 'MODEL')))}"
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
        choices = {"max_tokens": 4096, "align_tokens": 2048, **merge_choices(mc), "seed": cfg.get("seed", 0)}
        flags = " ".join(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {q(str(v))}"
                         for k, v in choices.items() if v is not False)
        return (f"moe-slim merge {q(model)} --stats {q(stats)} --method {row['method']} --ratio {row['ratio']:g} "
                f"--mix {q(mix)} {flags} --out {q(out)}")
    if row["method"] == "mone" and row.get("budget") != "global":
        return (f"moe-slim mone {q(model)} --stats {q(stats)} --ratio {row['ratio']:g} --mix {q(mix)} --out {q(out)} "
                "(vLLM expert substitution; add --standard for a checkpoint plain transformers loads)")
    cmd = (f"moe-slim prune {q(model)} --stats {q(stats)} --criterion {row['method']} --ratio {row['ratio']:g} "
           f"--mix {q(mix)}")
    if row.get("budget") == "global":
        cmd += " --budget global" + (f" --floor {cfg['floor']}" if cfg.get("floor") else "")
        cmd += "  # global budgets keep different counts per layer: in-memory only, not writable as a checkpoint"
    if cfg.get("seed"):
        cmd += f" --seed {cfg['seed']}"
    return cmd + f" --out {q(out)}"
