"""The results store: one SQLite row per point (WAL), committed by the parent process only.

A killed sweep loses at most the points in flight and never leaves a partial row. ``meta`` holds
the spec and the keys of the latest run's points, so reports read only those.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import MoeSlimError
from .grid import _canonical

DB_NAME = "results.db"
HEADLINE = ("chrf", "mc_acc", "math_em", "ppl", "gen_score")


# -- the results store --------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    key TEXT PRIMARY KEY, sweep TEXT, kind TEXT, method TEXT, mix TEXT, ratio REAL, budget TEXT, config TEXT,
    metrics TEXT, chrf REAL, mc_acc REAL, math_em REAL, ppl REAL, gen_score REAL,
    params INTEGER, params_baseline INTEGER, experts_kept INTEGER, experts_total INTEGER, kept_per_layer TEXT,
    timings TEXT, model_fingerprint TEXT, model_hash TEXT, stats_fingerprint TEXT, data_hashes TEXT,
    versions TEXT, created TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS hypotheses (key TEXT PRIMARY KEY, data TEXT);
"""
COLUMNS = ("key", "sweep", "kind", "method", "mix", "ratio", "budget", "config", "metrics", *HEADLINE, "params",
           "params_baseline", "experts_kept", "experts_total", "kept_per_layer", "timings", "model_fingerprint",
           "model_hash", "stats_fingerprint", "data_hashes", "versions", "created")


def open_db(path: str | os.PathLike) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA)
    conn.commit()
    return conn


def done_keys(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT key FROM points")}


def insert_row(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    """One point, one transaction: a row (and its translation hypotheses) are either complete or absent."""
    vals = [row.get(c) for c in COLUMNS]
    vals = [_canonical(v) if isinstance(v, (dict, list)) else v for v in vals]
    with conn:
        conn.execute(f"INSERT OR REPLACE INTO points ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                     vals)
        if row.get("hypotheses"):
            conn.execute("INSERT OR REPLACE INTO hypotheses (key, data) VALUES (?, ?)",
                         (row["key"], _canonical(row["hypotheses"])))


def hypotheses(conn: sqlite3.Connection, key: str) -> dict[str, str] | None:
    """A point's translation hypotheses by sentence id (what paired comparisons with it need)."""
    found = conn.execute("SELECT data FROM hypotheses WHERE key = ?", (key,)).fetchone()
    return json.loads(found[0]) if found else None


def read_rows(path: str | os.PathLike, *, stale: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of the database's latest sweep (JSON columns decoded) and its meta table.

    Rows of points the latest ``run_sweep`` did not ask for (an earlier spec, or the same spec on a
    model that has changed since) stay in the database for reuse but are left out; ``stale=True``
    returns every row. ``meta["stale_rows"]`` counts the rows left out.
    """
    p = Path(path)
    if p.is_dir():
        p = p / DB_NAME
    if not p.is_file():
        raise MoeSlimError(f"results database {p} does not exist (run `moe-slim sweep SPEC` first)")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM points ORDER BY created, key")]
        meta = {r["key"]: json.loads(r["value"]) for r in conn.execute("SELECT key, value FROM meta")}
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise MoeSlimError(f"{p} is not a moe_slim results database ({exc})") from exc
    current = set(meta.get("point_keys") or ())
    kept = rows if stale or not current else [r for r in rows if r["key"] in current]
    meta["stale_rows"] = len(rows) - len(kept)
    rows = kept
    for r in rows:
        for c in ("config", "metrics", "kept_per_layer", "timings", "model_fingerprint", "data_hashes", "versions"):
            if r.get(c):
                r[c] = json.loads(r[c])
    return rows, meta


# -- headline numbers ---------------------------------------------------------------------------


def headline(metrics: dict[str, float]) -> dict[str, float | None]:
    """chrF, mean multiple-choice accuracy, math exact match, perplexity, and the generative score."""
    acc = [v for k, v in metrics.items() if k.endswith("/acc") and v is not None]
    chrf = metrics.get("translation/chrf")
    em = metrics.get("math_gen/exact_match")
    return {"chrf": chrf, "mc_acc": sum(acc) / len(acc) if acc else None, "math_em": em,
            "ppl": metrics.get("perplexity/ppl"), "gen_score": chrf if chrf is not None else em}
