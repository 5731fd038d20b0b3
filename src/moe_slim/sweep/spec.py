"""The sweep spec: a YAML file checked completely before any work.

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
                                           # evaluating (moe_slim.recover.stage.recover; keys as sft()); baseline untouched
    write_best: null                       # true (= "chrf>=0.98*baseline") or a target: write the best point's
                                           # checkpoint to OUT/best when the sweep is complete
    device: auto                           # cpu, cuda, cuda:N or auto (the GPU when there is one)
    dtype: auto                            # compute dtype: auto (the checkpoint's on a GPU, float32 on a CPU)
    seed: 0
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MoeSlimError
from .grid import Point, _normalise_mix, mix_label, simplex_grid

DOMAINS: tuple[str, ...] = ("general", "math", "code", "translation")
BUDGETS: tuple[str, ...] = ("uniform", "global")
SWEEP_FORMAT = "moe_slim.sweep/1"
TOP_KEYS = {"model", "data_dir", "calibration", "mixes", "methods", "ratios", "budgets", "floor", "merge", "eval",
            "recover", "write_best", "seed", "name", "device", "dtype"}
CALIB_KEYS = {"domains", "split", "texts_per_domain", "max_tokens", "seq_len", "batch_size", "samples"}
MERGE_KEYS = {"max_tokens", "group_size", "align_tokens"}
EVAL_KEYS = {"suite", "tasks", "limit", "batch_size"}


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
    device: str = "auto"  # where points run (cpu, cuda, cuda:N, auto)
    dtype: str = "auto"  # compute dtype (auto: the checkpoint's on a GPU, float32 on a CPU)
    raw: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # the spec file, when read from one
    mix_names: dict[str, str] = field(default_factory=dict)  # weights label -> name

    @property
    def has_merge(self) -> bool:
        from ..experts.merge.methods import METHODS

        return any(m in METHODS for m in self.methods)

    def points(self) -> list[Point]:
        from ..experts.merge.methods import METHODS

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
    from ..experts.criteria import ALL_CRITERIA
    from ..experts.merge.methods import METHODS

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
        from ..recover.stage import RECOVER_KEYS

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
        from .targets import parse_target

        parse_target(write_best)
    device, dtype = str(raw.get("device", "auto")), str(raw.get("dtype", "auto"))
    from ..modeling.loading import parse_dtype

    parse_dtype(dtype)

    spec = SweepSpec(model=raw["model"], data_dir=data_dir, calibration=cal, mixes=unique, methods=list(methods),
                     ratios=[float(r) for r in ratios], budgets=list(budgets), floor=floor, merge=merge, eval=ev,
                     seed=seed, name=str(raw.get("name", "sweep")), write_best=write_best, recover=recover, device=device, dtype=dtype, raw=raw,
                     mix_names=mix_names)
    if check_files:
        check_inputs(spec)
    return spec


def check_inputs(spec: SweepSpec) -> None:
    """Model, calibration files and evaluation data exist and are usable: fail before any work."""
    from ..evals.run import plan_evaluation
    from ..families import family_of
    from ..modeling.loading import load_config

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
    spec = parse_spec(raw)
    spec.path = str(p)
    return spec
