"""Prune against merge at equal ratio: for every calibration mix and ratio a sweep has both, each merge
point's chrF minus each prune point's, paired on the same sentences (the hypotheses the store keeps)
with a bootstrap interval; an interval that holds 0 is a tie."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from ..evals.translation import compare_results
from .store import DB_NAME, hypotheses


def pairs_at_equal_ratio(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(merge point, prune point) at the same ratio, mix and budget."""
    same = lambda a, b: (a["ratio"], a["mix"], a["budget"]) == (b["ratio"], b["mix"], b["budget"])  # noqa: E731
    merges = [r for r in rows if r["kind"] == "merge"]
    prunes = [r for r in rows if r["kind"] == "prune"]
    return sorted(((m, p) for m in merges for p in prunes if same(m, p)),
                  key=lambda mp: (mp[0]["mix"], mp[0]["ratio"], mp[0]["method"], mp[1]["method"]))


def prune_vs_merge(db: str | os.PathLike, rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The report's section (Markdown lines)."""
    lines = ["## Merge against prune at equal ratio (paired on the same sentences)", ""]
    pairs = pairs_at_equal_ratio(rows)
    if not pairs:
        return lines + ["This sweep has no merge and prune points at the same ratio and mix, so none are paired.", ""]
    data_dir = meta.get("data_dir")
    split = ((meta.get("spec") or {}).get("eval") or {}).get("split", "test")
    if not data_dir or not Path(data_dir).is_dir():
        return lines + [f"The sweep's data directory {data_dir} is not here: the references the pairs need are "
                        "missing, so none are paired.", ""]
    p = Path(db)
    conn = sqlite3.connect(f"file:{p / DB_NAME if p.is_dir() else p}?mode=ro", uri=True)
    lines += ["| mix | ratio | merge | prune | chrF merge | chrF prune | merge − prune [95% CI] | n |",
              "|---|---|---|---|---|---|---|---|"]
    for m, q in pairs:
        hm, hq = hypotheses(conn, m["key"]), hypotheses(conn, q["key"])
        if not hm or not hq:
            continue
        c = compare_results(hm, hq, data_dir, split)
        d = c["overall"]["chrf"]
        lo, hi = d["delta_ci95"]
        lines.append(f"| {m['mix']} | {m['ratio']:g} | {m['method']} | {q['method']} | {d['system']:.2f} | "
                     f"{d['baseline']:.2f} | {'~' if lo <= 0 <= hi else ''}{d['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] "
                     f"| {c['n']} |")
    conn.close()
    return lines + ["", "'~': the interval holds 0, a tie (neither method is better on these sentences).", ""]
