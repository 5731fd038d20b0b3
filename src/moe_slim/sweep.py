"""Calibration-mix sweeps: one observation, many pruned/merged variants, one SQLite results store.

    >>> spec = load_spec("sweeps/demo.yaml")          # checked completely before any work
    >>> summary = run_sweep(spec, out="runs/sweep-demo", jobs=1)

A sweep is the grid ``mixes x methods x ratios x budgets`` plus the unpruned baseline (method
``none``, ratio 0). Work is shared wherever the statistics allow:

* the calibration text is observed **once per domain** (with token samples when a merge method is
  in the grid); every mix is ``stats.mix(w)`` of those sums and every merge draws its sample from
  the same per-domain reservoirs. The statistics are cached under ``OUT/stats/<key>/`` so a re-run
  does not observe again;
* every point is evaluated in memory: ``copy.deepcopy`` of the loaded model, apply the plan (or
  merge), evaluate, throw away. No checkpoint is written unless ``write_best`` asks for one.

Results go to ``OUT/results.db`` (SQLite, WAL), one row per point, committed in its own
transaction by the parent process only, so a killed sweep loses at most the points in flight and
never leaves a partial row. A point's key is a hash of its canonical configuration (point, model
content hash, calibration, evaluation, merge settings, seed): re-running the same spec skips the
points already done; changing the model or the evaluation makes new points.

Spec schema (YAML; relative paths resolve against the current directory)::

    model: models/reference                # checkpoint directory (required)
    data_dir: data                         # built data (calibration split and eval test splits)
    calibration:
      domains: [general, math, code, translation]   # observed domains (default: these four)
      split: calibration                   # data/<domain>/<split>.jsonl, field "text"
      texts_per_domain: 128                # first N texts of each domain
      max_tokens: 32k                      # token budget per domain (optional)
      seq_len: 256
      batch_size: 8
      samples: 4096                        # merge sample tokens per domain and layer (merge methods only)
    mixes:                                 # list of weight dicts and/or simplex grids
      - {translation: 1}
      - {name: balanced, weights: {general: 1, translation: 1}}   # a named mix (its label in tables)
      - grid: {domains: [general, math, code], step: 0.5}
    methods: [reap, frequency, task_contrast, ream, hc-smoe]   # criteria and/or merge methods
    ratios: [0.25, 0.5, 0.75]              # share of experts removed per layer, in (0, 1)
    budgets: [uniform]                     # uniform and/or global (prune only; merges are uniform)
    floor: null                            # per-layer floor for the global budget
    merge: {max_tokens: 4096, group_size: 16}
    eval: {suite: quick, tasks: [translation, translation_choice, perplexity], limit: 20}
    recover: null                          # {sft: {steps: N, ...}}: fine-tune every pruned/merged point before
                                           # evaluating (moe_slim.sft.recover; keys as sft()); baseline untouched
    write_best: null                       # true (= "chrf>=0.98*baseline") or a target: write the best point's
                                           # checkpoint to OUT/best when the sweep is complete
    seed: 0
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .evals.data import file_sha256
from .errors import MoeSlimError

DOMAINS: tuple[str, ...] = ("general", "math", "code", "translation")
BUDGETS: tuple[str, ...] = ("uniform", "global")
DB_NAME = "results.db"
SWEEP_FORMAT = "moe_slim.sweep/1"
TOP_KEYS = {"model", "data_dir", "calibration", "mixes", "methods", "ratios", "budgets", "floor", "merge", "eval",
            "recover", "write_best", "seed", "name"}
CALIB_KEYS = {"domains", "split", "texts_per_domain", "max_tokens", "seq_len", "batch_size", "samples"}
MERGE_KEYS = {"max_tokens", "group_size", "align_tokens"}
EVAL_KEYS = {"suite", "tasks", "limit", "batch_size"}
HEADLINE = ("chrf", "mc_acc", "math_em", "ppl", "gen_score")

Evaluator = Callable[[Any, Any, dict[str, Any]], dict[str, Any]]


# -- spec ---------------------------------------------------------------------------------------


@dataclass
class Point:
    """One configuration of the grid. ``method == "none"`` is the unpruned baseline."""

    method: str
    kind: str  # "baseline" | "prune" | "merge"
    ratio: float
    budget: str
    mix: dict[str, float] | None
    name: str | None = None  # the mix's name in the spec, if it has one

    @property
    def mix_label(self) -> str:
        return self.name or mix_label(self.mix)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "kind": self.kind, "ratio": self.ratio, "budget": self.budget, "mix": self.mix}


@dataclass
class SweepSpec:
    model: str
    data_dir: str
    calibration: dict[str, Any]
    mixes: list[dict[str, float]]
    methods: list[str]
    ratios: list[float]
    budgets: list[str]
    floor: int | None
    merge: dict[str, Any]
    eval: dict[str, Any]
    seed: int = 0
    name: str = "sweep"
    write_best: str | None = None
    recover: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    mix_names: dict[str, str] = field(default_factory=dict)  # weights label -> name

    @property
    def has_merge(self) -> bool:
        from .merge import METHODS

        return any(m in METHODS for m in self.methods)

    def points(self) -> list[Point]:
        from .merge import METHODS

        pts = [Point("none", "baseline", 0.0, "-", None)]
        for mix in self.mixes:
            for method in self.methods:
                kind = "merge" if method in METHODS else "prune"
                for ratio in self.ratios:
                    for budget in (["uniform"] if kind == "merge" else self.budgets):
                        pts.append(Point(method, kind, ratio, budget, mix, self.mix_names.get(mix_label(mix))))
        return pts

    def shared_config(self, model_hash: str) -> dict[str, Any]:
        """What every point's result depends on besides the point itself."""
        return {"model_hash": model_hash, "calibration": self.calibration, "eval": self.eval, "seed": self.seed,
                "merge": self.merge if self.has_merge else None, "floor": self.floor, "format": SWEEP_FORMAT,
                **({"recover": self.recover} if self.recover else {})}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:n]


def point_key(point: Point, shared: dict[str, Any]) -> str:
    """Hash of a point's canonical configuration (with everything its result depends on)."""
    return _hash({"point": point.config(), "shared": shared}, 32)


def mix_label(mix: dict[str, float] | None) -> str:
    if not mix:
        return "-"
    return ",".join(f"{d}={w:g}" for d, w in mix.items())


def _normalise_mix(mix: dict[str, float]) -> dict[str, float]:
    total = sum(mix.values())
    return {d: round(w / total, 6) for d, w in sorted(mix.items()) if w > 0}


def simplex_grid(domains: list[str], step: float) -> list[dict[str, float]]:
    """Every mix over ``domains`` whose weights are multiples of ``step`` and sum to 1."""
    n = round(1.0 / step)
    if n < 1 or abs(n * step - 1.0) > 1e-6:
        raise MoeSlimError(f"spec: mixes grid step {step} must divide 1 (e.g. 0.5, 0.25, 0.1)")
    out = []
    for parts in itertools.product(range(n + 1), repeat=len(domains)):
        if sum(parts) == n:
            out.append(_normalise_mix({d: p / n for d, p in zip(domains, parts)}))
    return out


def parse_tokens(value: Any, where: str) -> int:
    """``32k`` / ``1.5m`` / ``4096`` -> int (positive)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            n = int(value)
        else:
            t = str(value).strip().lower()
            mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
            n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise MoeSlimError(f"spec: {where} must be a token count like 4096 or 32k (got {value!r})") from None
    if n < 1:
        raise MoeSlimError(f"spec: {where} must be positive (got {value!r})")
    return n


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise MoeSlimError(f"spec: {msg}")


def _unknown(keys: Iterable[str], allowed: set[str], where: str) -> None:
    bad = sorted(set(keys) - allowed)
    _need(not bad, f"unknown key '{bad[0] if bad else ''}' in {where} (allowed: {', '.join(sorted(allowed))})")


def _int(value: Any, where: str, minimum: int = 1) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
          f"{where} must be an integer >= {minimum} (got {value!r})")
    return value


def parse_spec(raw: Any, *, check_files: bool = True) -> SweepSpec:
    """Check a spec (a dict from YAML) completely and return it; MoeSlimError naming the first bad key or value."""
    from .criteria import ALL_CRITERIA
    from .merge import METHODS

    _need(isinstance(raw, dict), "a sweep spec is a YAML mapping with at least 'model' and 'methods'")
    _unknown(raw, TOP_KEYS, "the spec")
    _need("model" in raw and isinstance(raw["model"], str), "'model' (a checkpoint directory) is required")
    data_dir = raw.get("data_dir", "data")
    _need(isinstance(data_dir, str), f"data_dir must be a path (got {data_dir!r})")

    cal_raw = raw.get("calibration") or {}
    _need(isinstance(cal_raw, dict), "calibration must be a mapping")
    _unknown(cal_raw, CALIB_KEYS, "calibration")
    domains = cal_raw.get("domains", list(DOMAINS))
    _need(isinstance(domains, list) and domains and all(isinstance(d, str) for d in domains),
          f"calibration.domains must be a non-empty list of domain names (got {domains!r})")
    _need(len(set(domains)) == len(domains), f"calibration.domains lists a domain twice ({domains})")
    cal = {
        "domains": list(domains),
        "split": str(cal_raw.get("split", "calibration")),
        "texts_per_domain": _int(cal_raw.get("texts_per_domain", 128), "calibration.texts_per_domain"),
        "max_tokens": parse_tokens(cal_raw["max_tokens"], "calibration.max_tokens") if cal_raw.get("max_tokens")
        is not None else None,
        "seq_len": _int(cal_raw.get("seq_len", 256), "calibration.seq_len"),
        "batch_size": _int(cal_raw.get("batch_size", 8), "calibration.batch_size"),
        "samples": parse_tokens(cal_raw.get("samples", 4096), "calibration.samples"),
    }

    mixes_raw = raw.get("mixes")
    _need(isinstance(mixes_raw, list) and mixes_raw, "mixes must be a non-empty list of weight dicts or grids")
    mixes: list[dict[str, float]] = []
    mix_names: dict[str, str] = {}
    for i, m in enumerate(mixes_raw):
        _need(isinstance(m, dict) and m, f"mixes[{i}] must be a mapping like {{translation: 1}} or {{grid: ...}}")
        if "grid" in m:
            g = m["grid"]
            _need(len(m) == 1 and isinstance(g, dict), f"mixes[{i}]: a grid entry is {{grid: {{domains: [...], step: S}}}}")
            _unknown(g, {"domains", "step"}, f"mixes[{i}].grid")
            gd = g.get("domains")
            _need(isinstance(gd, list) and gd, f"mixes[{i}].grid.domains must be a non-empty list")
            for d in gd:
                _need(d in domains, f"mixes[{i}].grid names domain '{d}', which is not calibrated "
                      f"(calibration.domains: {', '.join(domains)})")
            step = g.get("step")
            _need(isinstance(step, (int, float)) and not isinstance(step, bool) and 0 < step <= 1,
                  f"mixes[{i}].grid.step must be a number in (0, 1] (got {step!r})")
            mixes.extend(simplex_grid(list(gd), float(step)))
            continue
        name = None
        if "weights" in m:
            _unknown(m, {"name", "weights"}, f"mixes[{i}]")
            name, m = m.get("name"), m["weights"]
            _need(name is None or (isinstance(name, str) and name.strip()), f"mixes[{i}].name must be a string")
            _need(isinstance(m, dict) and m, f"mixes[{i}].weights must be a mapping like {{translation: 1}}")
        for d, w in m.items():
            _need(d in domains, f"mixes[{i}] names domain '{d}', which is not calibrated "
                  f"(calibration.domains: {', '.join(domains)})")
            _need(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0,
                  f"mixes[{i}].{d} must be a non-negative number (got {w!r})")
        _need(sum(m.values()) > 0, f"mixes[{i}] has no positive weight")
        mixes.append(_normalise_mix({d: float(w) for d, w in m.items()}))
        if name:
            mix_names[mix_label(mixes[-1])] = name
    unique: list[dict[str, float]] = []
    for m in mixes:
        if m not in unique:
            unique.append(m)

    methods = raw.get("methods")
    _need(isinstance(methods, list) and methods, "methods must be a non-empty list")
    allowed = [*ALL_CRITERIA, *METHODS]
    for m in methods:
        _need(m in allowed, f"unknown method '{m}' (criteria: {', '.join(ALL_CRITERIA)}; merges: {', '.join(METHODS)})")
    ratios = raw.get("ratios", [0.5])
    _need(isinstance(ratios, list) and ratios, "ratios must be a non-empty list")
    for r in ratios:
        _need(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < 1,
              f"ratio {r!r} must be a number in (0, 1) (the share of experts removed)")
    budgets = raw.get("budgets", ["uniform"])
    budgets = [budgets] if isinstance(budgets, str) else budgets
    _need(isinstance(budgets, list) and budgets, "budgets must be a list of uniform/global")
    for b in budgets:
        _need(b in BUDGETS, f"unknown budget '{b}' (choose from: {', '.join(BUDGETS)})")
    floor = raw.get("floor")
    if floor is not None:
        _int(floor, "floor")

    merge_raw = raw.get("merge") or {}
    _need(isinstance(merge_raw, dict), "merge must be a mapping")
    _unknown(merge_raw, MERGE_KEYS, "merge")
    merge = {"max_tokens": parse_tokens(merge_raw.get("max_tokens", 4096), "merge.max_tokens"),
             "group_size": _int(merge_raw.get("group_size", 16), "merge.group_size"),
             "align_tokens": parse_tokens(merge_raw.get("align_tokens", 2048), "merge.align_tokens")}

    ev_raw = raw.get("eval") or {}
    _need(isinstance(ev_raw, dict), "eval must be a mapping like {suite: quick, limit: 20}")
    _unknown(ev_raw, EVAL_KEYS, "eval")
    tasks = ev_raw.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    _need(tasks is None or (isinstance(tasks, list) and tasks), "eval.tasks must be a list of task names")
    ev = {"suite": str(ev_raw.get("suite", "quick")), "tasks": tasks,
          "limit": _int(ev_raw["limit"], "eval.limit") if ev_raw.get("limit") is not None else None,
          "batch_size": _int(ev_raw["batch_size"], "eval.batch_size") if ev_raw.get("batch_size") else None}

    recover = raw.get("recover") or None
    if recover is not None:
        _need(isinstance(recover, dict) and set(recover) == {"sft"} and isinstance(recover["sft"], dict),
              f"recover must be {{sft: {{steps: N, ...}}}} (got {recover!r})")
        try:
            from .sft import RECOVER_KEYS
        except ImportError:
            raise MoeSlimError("spec: recover.sft is not available yet in this installation (moe_slim.sft is "
                               "missing); remove 'recover' from the spec") from None
        _unknown(recover["sft"], set(RECOVER_KEYS), "recover.sft")
        _int(recover["sft"].get("steps"), "recover.sft.steps")
        recover = {"sft": dict(recover["sft"])}
    seed = raw.get("seed", 0)
    _int(seed, "seed", minimum=0)
    write_best = raw.get("write_best")
    if write_best is True:
        write_best = "chrf>=0.98*baseline"
    if write_best is False:
        write_best = None
    if write_best is not None:
        _need(isinstance(write_best, str), "write_best must be true or a target like 'chrf>=0.98*baseline'")
        from .report import parse_target

        parse_target(write_best)

    spec = SweepSpec(model=raw["model"], data_dir=data_dir, calibration=cal, mixes=unique, methods=list(methods),
                     ratios=[float(r) for r in ratios], budgets=list(budgets), floor=floor, merge=merge, eval=ev,
                     seed=seed, name=str(raw.get("name", "sweep")), write_best=write_best, recover=recover, raw=raw,
                     mix_names=mix_names)
    if check_files:
        check_inputs(spec)
    return spec


def check_inputs(spec: SweepSpec) -> None:
    """Model, calibration files and evaluation data exist and are usable: fail before any work."""
    from .evaluate import plan_evaluation
    from .families import family_of
    from .loading import load_config

    family_of(load_config(spec.model))
    data = Path(spec.data_dir)
    _need(data.is_dir(), f"data_dir {data} does not exist (build it with `moe-slim data build` or fix data_dir)")
    for d in spec.calibration["domains"]:
        p = data / d / f"{spec.calibration['split']}.jsonl"
        _need(p.is_file(), f"calibration domain '{d}' has no file {p} (fix calibration.domains or build the data)")
    plan_evaluation(spec.eval["suite"], tasks=spec.eval["tasks"], data_dir=spec.data_dir, limit=spec.eval["limit"])


def load_spec(path: str | os.PathLike, **overrides: Any) -> SweepSpec:
    """Read and check a YAML spec (``overrides`` replace top-level keys)."""
    p = Path(path)
    if not p.is_file():
        raise MoeSlimError(f"sweep spec {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MoeSlimError(f"sweep spec {p} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if isinstance(raw, dict):
        raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_spec(raw)


# -- hashing inputs -----------------------------------------------------------------------------


def model_content_hash(model_dir: str | os.PathLike) -> str:
    """sha256 over the checkpoint's config and weight files (names and contents)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "tokenizer.json")):
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


def read_calibration(spec: SweepSpec) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The first ``texts_per_domain`` texts of each calibration domain, and each file's sha256."""
    texts: dict[str, list[str]] = {}
    hashes: dict[str, str] = {}
    c = spec.calibration
    for d in c["domains"]:
        p = Path(spec.data_dir) / d / f"{c['split']}.jsonl"
        out: list[str] = []
        with p.open(encoding="utf-8") as fh:
            for line in fh:
                if len(out) >= c["texts_per_domain"]:
                    break
                if line.strip():
                    out.append(str(json.loads(line)["text"]))
        if not out:
            raise MoeSlimError(f"calibration domain '{d}' has no text in {p}")
        texts[d] = out
        hashes[str(p)] = file_sha256(p)[:16]
    return texts, hashes


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
    """One point, one transaction: a row is either complete or absent."""
    vals = [row.get(c) for c in COLUMNS]
    vals = [_canonical(v) if isinstance(v, (dict, list)) else v for v in vals]
    with conn:
        conn.execute(f"INSERT OR REPLACE INTO points ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                     vals)


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


def default_evaluator(model: Any, tok: Any, ev: dict[str, Any]) -> dict[str, Any]:
    from .evaluate import evaluate

    return evaluate(model, tok, ev["suite"], data_dir=ev["data_dir"], tasks=ev.get("tasks"), limit=ev.get("limit"),
                    batch_size=ev.get("batch_size"), hash_weights=False)


# -- running points -----------------------------------------------------------------------------


class PointRunner:
    """Holds the loaded model, its statistics and the evaluator; runs one point at a time in memory."""

    def __init__(self, spec: SweepSpec, stats_dir: str | os.PathLike, shared: dict[str, Any],
                 calib_hashes: dict[str, str], evaluator: Evaluator | None = None, model: Any = None,
                 tok: Any = None, stats: Any = None) -> None:
        from .fingerprint import library_versions
        from .loading import load_model
        from .prune import count_parameters
        from .stats import RouterStats

        if model is None:
            model, tok = load_model(spec.model)
        self.model, self.tok = model, tok
        self.stats = stats if stats is not None else RouterStats.load(stats_dir)
        self.stats.check_model(self.model)
        self.spec, self.shared, self.calib_hashes = spec, shared, calib_hashes
        self.evaluator = evaluator or default_evaluator
        self.params_baseline = count_parameters(self.model)
        self.versions = library_versions()
        self.quiet_eval = False

    def run(self, point: Point, key: str) -> dict[str, Any]:
        from .api import plan_for
        from .fingerprint import model_fingerprint
        from .merge import merge_model
        from .prune import apply_plan, count_parameters

        spec = self.spec
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        E, L = self.stats.n_experts, self.stats.n_layers
        kept = [E] * L
        if point.kind == "baseline":
            m = self.model
        else:
            m = copy.deepcopy(self.model)
            if point.kind == "prune":
                plan = plan_for(m, self.stats, criterion=point.method, ratio=point.ratio, mix=point.mix,
                                budget=point.budget, floor=spec.floor, seed=spec.seed)
                timings["plan_s"] = time.perf_counter() - t0
                apply_plan(m, plan)
            else:
                mc = spec.merge
                plan = merge_model(m, self.stats, point.method, point.ratio, mix=point.mix,
                                   max_tokens=mc["max_tokens"], align_tokens=mc["align_tokens"],
                                   group_size=mc["group_size"], seed=spec.seed)
            kept = plan.kept_counts
        timings["apply_s"] = time.perf_counter() - t0
        recovered: dict[str, float] = {}
        if spec.recover and point.kind != "baseline":
            from .sft import recover

            t1 = time.perf_counter()
            recovered = recover(m, self.tok, spec.recover, data_dir=spec.data_dir)
            m.eval()
            timings["recover_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        ev = dict(spec.eval, data_dir=spec.data_dir)
        if self.quiet_eval:  # library progress bars (lm-eval, generation) would bury the sweep's own bar
            import contextlib

            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
                result = self.evaluator(m, self.tok, ev)
        else:
            result = self.evaluator(m, self.tok, ev)
        metrics = dict(result["metrics"]) if "metrics" in result else dict(result)
        metrics.update({k: float(v) for k, v in recovered.items() if isinstance(v, (int, float))})
        timings["eval_s"] = time.perf_counter() - t1
        timings["total_s"] = time.perf_counter() - t0
        data_hashes = dict(self.calib_hashes)
        for path, h in (result.get("data", {}).get("files", {}) if "metrics" in result else {}).items():
            data_hashes[str(path)] = h if isinstance(h, str) else _canonical(h)
        row = {
            "key": key, "sweep": spec.name, "kind": point.kind, "method": point.method, "mix": point.mix_label,
            "ratio": point.ratio, "budget": point.budget, "config": {**point.config(), **self.shared},
            "metrics": metrics, **headline(metrics), "params": count_parameters(m),
            "params_baseline": self.params_baseline, "experts_kept": int(sum(kept)), "experts_total": E * L,
            "kept_per_layer": list(kept), "timings": {k: round(v, 3) for k, v in timings.items()},
            "model_fingerprint": model_fingerprint(self.model), "model_hash": self.shared["model_hash"],
            "stats_fingerprint": self.shared.get("stats_key"), "data_hashes": data_hashes, "versions": self.versions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return row


_WORKER: PointRunner | None = None


def _worker_init(spec_raw: dict[str, Any], stats_dir: str, shared: dict[str, Any], calib_hashes: dict[str, str],
                 evaluator: Evaluator | None, threads: int) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = parse_spec(spec_raw, check_files=False)
    _WORKER = PointRunner(spec, stats_dir, shared, calib_hashes, evaluator)
    _WORKER.quiet_eval = True


def _worker_run(point: Point, key: str) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.run(point, key)


# -- the sweep ----------------------------------------------------------------------------------


def prepare_stats(spec: SweepSpec, out: Path, model: Any, tok: Any, model_hash: str,
                  log: Callable[[str], None]) -> tuple[Any, Path, str, dict[str, str]]:
    """Observe every calibration domain once (with merge samples if needed), cached under OUT/stats/<key>/."""
    from .observe import observe
    from .stats import RouterStats

    texts, hashes = read_calibration(spec)
    samples = spec.calibration["samples"] if spec.has_merge else 0
    key = _hash({"model_hash": model_hash, "calibration": spec.calibration, "samples": samples, "data": hashes})
    stats_dir = out / "stats" / key
    if (stats_dir / "meta.json").exists():
        stats = RouterStats.load(stats_dir)
        stats.check_model(model)
        log(f"statistics: cached in {stats_dir}")
        return stats, stats_dir, key, hashes
    c = spec.calibration
    t = time.perf_counter()
    stats = observe(model, tok, texts, seq_len=c["seq_len"], batch_size=c["batch_size"], max_tokens=c["max_tokens"],
                    samples=samples)
    stats.meta["model_path"] = spec.model
    stats.meta["calibration"] = {"sweep": spec.name, **c, "files": hashes}
    stats.save(stats_dir)
    log(f"statistics: observed {len(texts)} domains once in {time.perf_counter() - t:.0f}s -> {stats_dir}")
    return stats, stats_dir, key, hashes


def run_sweep(
    spec: SweepSpec,
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    evaluator: Evaluator | None = None,
    max_points: int | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run every point of ``spec`` not yet in ``OUT/results.db``; return a summary.

    ``max_points`` stops after that many new points (the rest run on the next call); ``on_point``
    is called with each row after it is committed. ``evaluator(model, tok, eval_cfg)`` replaces
    :func:`moe_slim.evaluate.evaluate` (it returns evaluate's dict or a flat metrics dict; with
    ``jobs > 1`` it must be a module-level function).
    """
    from tqdm import tqdm

    from .loading import load_model

    say = log or (lambda msg: None)
    if jobs < 1:
        raise MoeSlimError(f"--jobs must be at least 1 (got {jobs})")
    out = Path(out)
    model_hash = model_content_hash(spec.model)
    model, tok = load_model(spec.model)
    out.mkdir(parents=True, exist_ok=True)
    stats, stats_dir, stats_key, calib_hashes = prepare_stats(spec, out, model, tok, model_hash, say)
    shared = spec.shared_config(model_hash)
    shared_row = dict(shared, stats_key=stats_key)
    conn = open_db(out / DB_NAME)
    points = [(p, point_key(p, shared)) for p in spec.points()]
    with conn:
        # point_keys: the points of this spec on this model; reports read only these, so rows left in the
        # database by an earlier spec or another model (e.g. a retrained checkpoint) never mix into them
        for k, v in {"spec": spec.raw, "model": spec.model, "data_dir": spec.data_dir, "stats_dir": str(stats_dir),
                     "name": spec.name, "format": SWEEP_FORMAT, "point_keys": sorted(k for _, k in points)}.items():
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, _canonical(v)))
    done = done_keys(conn)
    todo = [(p, k) for p, k in points if k not in done]
    already = len(points) - len(todo)
    if max_points is not None:
        todo = todo[:max_points]
    say(f"sweep '{spec.name}': {len(points)} points ({already} already done, {len(todo)} to run, jobs={jobs}) "
        f"-> {out / DB_NAME}")
    ran = 0
    started = time.perf_counter()
    bar = tqdm(total=len(points), initial=already, desc="sweep", unit="pt", disable=not progress, dynamic_ncols=True)

    def commit(row: dict[str, Any]) -> None:
        nonlocal ran
        insert_row(conn, row)
        ran += 1
        bar.update(1)
        bar.set_postfix_str(f"{row['method']} {row['ratio']:g} {row['mix']}"[:40])
        if on_point is not None:
            on_point(row)

    try:
        if jobs == 1 or len(todo) <= 1:
            runner = PointRunner(spec, stats_dir, shared_row, calib_hashes, evaluator, model=model, tok=tok,
                                 stats=stats)
            runner.quiet_eval = progress
            for p, k in todo:
                commit(runner.run(p, k))
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            del model, stats
            threads = max(1, (os.cpu_count() or 1) // jobs)
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx, initializer=_worker_init,
                                     initargs=(spec.raw, str(stats_dir), shared_row, calib_hashes, evaluator,
                                               threads)) as pool:
                pending = {pool.submit(_worker_run, p, k) for p, k in todo}
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            commit(f.result())
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    finally:
        bar.close()
        conn.close()
    summary = {"out": str(out), "db": str(out / DB_NAME), "points": len(points), "already_done": already,
               "ran": ran, "remaining": len(points) - already - ran, "stats_dir": str(stats_dir),
               "seconds": round(time.perf_counter() - started, 1)}
    if spec.write_best and summary["remaining"] == 0:
        summary["best"] = write_best(out, spec.write_best, log=say)
    return summary


def write_best(out: str | os.PathLike, target: str, log: Callable[[str], None] | None = print) -> dict[str, Any] | None:
    """Write the checkpoint of the best point for ``target`` to ``OUT/best`` (through the prune/merge API)."""
    from .report import best_for_target

    rows, meta = read_rows(Path(out) / DB_NAME)
    best = best_for_target(rows, target, writable_only=True)
    if best is None or best["kind"] == "baseline":
        (log or print)(f"write_best: no pruned or merged point meets {target}; nothing written")
        return None
    dest = Path(out) / "best"
    cfg = best["config"]
    mix = cfg.get("mix")
    if best["kind"] == "prune":
        from .api import prune_checkpoint

        prune_checkpoint(meta["model"], meta["stats_dir"], dest, criterion=best["method"], ratio=best["ratio"],
                         mix=mix, budget=best["budget"], floor=cfg.get("floor"), seed=cfg.get("seed", 0),
                         overwrite=True)
    else:
        from .merge import merge_checkpoint

        mc = cfg.get("merge") or {}
        merge_checkpoint(meta["model"], dest, method=best["method"], ratio=best["ratio"], stats_path=meta["stats_dir"],
                         mix=mix, group_size=mc.get("group_size", 16), max_tokens=mc.get("max_tokens", 4096),
                         align_tokens=mc.get("align_tokens", 2048), seed=cfg.get("seed", 0), overwrite=True)
    (log or print)(f"write_best: {best['method']} ratio {best['ratio']:g} mix {best['mix']} -> {dest}")
    if cfg.get("recover"):
        from .report import command_for

        cmd = command_for(best, meta, out=str(dest))
        (log or print)(f"write_best: the sweep evaluated it after recovery; recover it with: {cmd.split(' && ', 1)[1]}")
    return {"key": best["key"], "out": str(dest)}
