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
    merge: {max_tokens: 4096}              # any merge option (group_size: REAM's C, default min(16, E/2))
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

from pydantic import Field, field_validator

from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..experts.merge.config import MergeOptions
from ..recover.stage import SftStage
from ..schema import (
    EvalSettings,
    NonNegativeInt,
    PositiveInt,
    SeqLen,
    Strict,
    Tokens,
    read_yaml,
    validate,
)
from .grid import Point, _normalise_mix, mix_label, simplex_grid

DOMAINS: tuple[str, ...] = ("general", "math", "code", "translation")
BUDGETS: tuple[str, ...] = ("uniform", "global")
SWEEP_FORMAT = "moe_slim.sweep/1"


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
        from ..experts.merge.config import NAMES

        return any(m in NAMES for m in self.methods)

    def points(self) -> list[Point]:
        from ..experts.merge.config import NAMES as METHODS

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


class CalibrationSettings(Strict):
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS), min_length=1)
    split: str = "calibration"
    texts_per_domain: PositiveInt = 128
    max_tokens: Tokens | None = None
    seq_len: SeqLen = 256
    batch_size: PositiveInt = 8
    samples: Tokens = 4096

    @field_validator("domains")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"calibration.domains lists a domain twice ({v})")
        return v


class MergeSettings(MergeOptions):
    """The merge options every merge point shares (the point gives ``method``); smaller samples by default."""

    max_tokens: Tokens = 4096
    align_tokens: Tokens = 2048


def merge_settings(m: MergeSettings) -> dict[str, Any]:
    """What a sweep stores: the sample sizes and C always (older sweeps' points stay reusable), other choices as set."""
    return {"max_tokens": m.max_tokens, "group_size": m.group_size, "align_tokens": m.align_tokens,
            **m.model_dump(exclude_unset=True, exclude={"method", "preset"})}


class SpecModel(Strict):
    """The sweep spec as read from YAML (see the module docstring); turned into :class:`SweepSpec`."""

    model: str
    data_dir: str | None = None
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    mixes: list[dict[str, Any]] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    ratios: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    budgets: list[str] | str = Field(default_factory=lambda: ["uniform"])
    floor: PositiveInt | None = None
    merge: MergeSettings = Field(default_factory=MergeSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    recover: dict[str, SftStage] | None = None
    write_best: bool | str | None = None
    seed: NonNegativeInt = 0
    name: str = "sweep"
    device: str = "auto"
    dtype: str = "auto"

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from ..experts.criteria import ALL_CRITERIA
        from ..experts.merge.config import NAMES as METHODS

        for m in v:
            if m not in (*ALL_CRITERIA, *METHODS):
                raise ValueError(f"unknown method '{m}' (criteria: {', '.join(ALL_CRITERIA)}; merges: {', '.join(METHODS)})")
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0 < r < 1:
                raise ValueError(f"ratio {r!r} must be a number in (0, 1) (the share of experts removed)")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[str] | str) -> list[str]:
        v = [v] if isinstance(v, str) else v
        for b in v:
            if b not in BUDGETS:
                raise ValueError(f"unknown budget '{b}' (choose from: {', '.join(BUDGETS)})")
        return v

    @field_validator("recover")
    @classmethod
    def _recover(cls, v: dict[str, SftStage] | None) -> dict[str, SftStage] | None:
        if v is not None and set(v) != {"sft"}:
            raise ValueError(f"recover must be {{sft: {{steps: N, ...}}}} (got keys {sorted(v)})")
        return v

    @field_validator("write_best")
    @classmethod
    def _target(cls, v: bool | str | None) -> str | None:
        if v is True:
            return "chrf>=0.98*baseline"
        if v is False or v is None:
            return None
        from .targets import parse_target

        try:
            parse_target(v)
        except MoeSlimError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        from ..modeling.loading import parse_dtype

        try:
            parse_dtype(v)
        except MoeSlimError as exc:
            raise ValueError(str(exc)) from None
        return v


def _mixes(entries: list[dict[str, Any]], domains: list[str]) -> tuple[list[dict[str, float]], dict[str, str]]:
    """Weight dicts, named mixes and simplex grids -> distinct normalised mixes, and their names."""
    mixes: list[dict[str, float]] = []
    names: dict[str, str] = {}
    for i, m in enumerate(entries):
        _need(bool(m), f"mixes[{i}] must be a mapping like {{translation: 1}} or {{grid: ...}}")
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
            names[mix_label(mixes[-1])] = name
    unique: list[dict[str, float]] = []
    for m in mixes:
        if m not in unique:
            unique.append(m)
    return unique, names


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise MoeSlimError(f"spec: {msg}")


def _unknown(keys: Iterable[str], allowed: set[str], where: str) -> None:
    bad = sorted(set(keys) - allowed)
    _need(not bad, f"unknown key '{bad[0] if bad else ''}' in {where} (allowed: {', '.join(sorted(allowed))})")


def parse_spec(raw: Any, *, check_files: bool = True) -> SweepSpec:
    """Check a spec (a dict from YAML) completely and return it; MoeSlimError naming the first bad key or value."""
    m = validate(SpecModel, raw, "spec")
    cal = m.calibration.model_dump()
    mixes, mix_names = _mixes(m.mixes, cal["domains"])
    ev = {"suite": m.eval.suite, "tasks": m.eval.tasks, "limit": m.eval.limit, "batch_size": m.eval.batch_size}
    if m.eval.split != "test":  # absent from older specs' stored settings, so their points are reused
        ev["split"] = m.eval.split
    recover = {"sft": {**m.recover["sft"].sft_kwargs(), "data": m.recover["sft"].data}} if m.recover else None
    data_dir = str(data_dir_or_default(m.data_dir))
    spec = SweepSpec(model=m.model, data_dir=data_dir, calibration=cal, mixes=mixes, methods=list(m.methods),
                     ratios=[float(r) for r in m.ratios], budgets=list(m.budgets), floor=m.floor,
                     merge=merge_settings(m.merge), eval=ev, seed=m.seed, name=m.name, write_best=m.write_best,
                     recover=recover, device=m.device, dtype=m.dtype, raw=raw, mix_names=mix_names)
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
    plan_evaluation(spec.eval["suite"], tasks=spec.eval["tasks"], data_dir=spec.data_dir, limit=spec.eval["limit"],
                    split=spec.eval.get("split", "test"))


def load_spec(path: str | os.PathLike, **overrides: Any) -> SweepSpec:
    """Read and check a YAML spec (``overrides`` replace top-level keys)."""
    p = Path(path)
    raw = read_yaml(p, "sweep spec")
    if isinstance(raw, dict):
        raw.update({k: v for k, v in overrides.items() if v is not None})
    spec = parse_spec(raw)
    spec.path = str(p)
    return spec
