"""Budgets and expert plans: which experts each layer keeps.

A plan is small JSON a person can read and edit; applying it needs no statistics. Budgets turn
scores into per-layer keep counts:

* ``uniform``: every layer keeps ``round(E * (1 - ratio))`` experts (the default);
* ``global``: one ranking across layers (scores normalised per layer), with a per-layer floor
  that is never below top-k;
* explicit per-layer counts from a JSON/YAML file (a list, or a map of layer name -> count).

Group-limited routers (DeepSeek) are pruned equally per group so the router stays valid.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import MoeSlimError
from ..families import Family, group_size_ok

PLAN_FORMAT = "moe_slim.plan/1"


@dataclass
class LayerPlan:
    name: str
    keep: list[int]  # original expert indices kept, ascending
    scores: list[float] = field(default_factory=list)  # score of every original expert (may be empty)
    # token-routed (hash) layers only: removed expert -> the kept expert its table entries go to
    # (:mod:`moe_slim.experts.token_table`); absent from the JSON of every other layer
    remap: dict[int, int] = field(default_factory=dict, kw_only=True)


@dataclass
class ExpertPlan:
    """Which experts each MoE layer keeps, plus where the decision came from."""

    family: str
    num_experts: int
    top_k: int
    layers: list[LayerPlan]
    kind: str = "prune"
    info: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    @property
    def uniform(self) -> bool:
        return len({len(l.keep) for l in self.layers}) == 1

    @property
    def kept_counts(self) -> list[int]:
        return [len(l.keep) for l in self.layers]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for layer in d["layers"]:
            if not layer["remap"]:
                del layer["remap"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    def check_writable(self) -> None:
        """A one-line error when this plan cannot be written as a standard checkpoint."""
        require_writable(self)

    def write_files(self, directory: str | os.PathLike) -> None:
        """Write ``plan.json`` (and whatever else replaying the plan needs) into a checkpoint directory."""
        self.save(Path(directory) / "plan.json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertPlan:
        if d.get("format") != PLAN_FORMAT:
            raise MoeSlimError(f"not a moe_slim expert plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        try:
            layers = [LayerPlan(l["name"], [int(i) for i in l["keep"]], [float(s) for s in l.get("scores", [])],
                                remap={int(e): int(t) for e, t in l.get("remap", {}).items()}) for l in d["layers"]]
            return cls(d["family"], int(d["num_experts"]), int(d["top_k"]), layers, d.get("kind", "prune"),
                       d.get("info", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise MoeSlimError(f"expert plan is malformed: missing or bad field {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertPlan:
        return cls.from_dict(read_plan_json(path))

    def validate(self, family: Family, config: Any, layer_names: list[str]) -> None:
        """One-line errors for plans that do not fit the model."""
        if self.family != family.name:
            raise MoeSlimError(f"plan is for family {self.family}; this model is {family.name}")
        if [l.name for l in self.layers] != layer_names:
            raise MoeSlimError("plan names other MoE layers than this model has (make the plan on this model)")
        top_k = family.top_k(config)
        for l in self.layers:
            if len(set(l.keep)) != len(l.keep) or any(not 0 <= i < self.num_experts for i in l.keep):
                raise MoeSlimError(f"plan for {l.name} keeps invalid or repeated experts {l.keep}")
            if len(l.keep) < top_k:
                raise MoeSlimError(f"plan keeps {len(l.keep)} experts in {l.name}, fewer than top-k={top_k}")
            bad = [(e, t) for e, t in l.remap.items() if e in l.keep or not 0 <= e < self.num_experts or t not in l.keep]
            if bad:
                raise MoeSlimError(f"plan remaps {l.name}'s expert {bad[0][0]} to {bad[0][1]}; a remap sends a removed "
                                   "expert to a kept one")


def require_writable(plan: ExpertPlan) -> None:
    """Plans with different counts per layer cannot be expressed in a transformers config."""
    if not plan.uniform:
        raise MoeSlimError(
            f"this plan keeps different expert counts per layer ({sorted(set(plan.kept_counts))}); transformers "
            "configs hold one count, so it cannot be written as a standard checkpoint "
            "(use --budget uniform, or evaluate the model in memory)"
        )


def read_plan_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a plan file, or a one-line error when missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise MoeSlimError(f"plan file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeSlimError(f"plan file {p} is not valid JSON") from exc


def uniform_counts(n_layers: int, n_experts: int, ratio: float) -> list[int]:
    check_ratio(ratio)
    return [int(round(n_experts * (1.0 - ratio)))] * n_layers


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise MoeSlimError(f"ratio must be strictly between 0 and 1 (the share of experts removed); got {ratio}")


def global_counts(scores: torch.Tensor, ratio: float, floor: int, group: int = 1) -> list[int]:
    """Keep counts from one ranking across layers of per-layer-normalised scores."""
    check_ratio(ratio)
    L, E = scores.shape
    total = int(round(L * E * (1.0 - ratio)))
    if floor * L > total:
        raise MoeSlimError(f"a floor of {floor} experts per layer needs {floor * L} experts, more than the {total} kept")
    share = scores / scores.sum(1, keepdim=True).clamp_min(1e-30)
    counts = [floor] * L
    order = torch.argsort(share, dim=1, descending=True)
    # candidates beyond the floor, best first (ties: lower layer, lower rank)
    cand = sorted(
        ((float(share[l, order[l, r]]), l, r) for l in range(L) for r in range(floor, E)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    remaining = total - floor * L
    for _, l, _ in cand:
        if remaining <= 0:
            break
        counts[l] += 1
        remaining -= 1
    if group > 1:  # round each layer down to whole groups
        counts = [max(floor, c - c % group) for c in counts]
    return counts


def explicit_counts(path: str | os.PathLike, layer_names: list[str]) -> list[int]:
    """Per-layer keep counts from a JSON/YAML list or map ``layer name -> count``."""
    p = Path(path)
    if not p.is_file():
        raise MoeSlimError(f"budget file {p} does not exist (use uniform, global, or a JSON/YAML file)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise MoeSlimError(f"budget file {p} is not valid JSON/YAML") from exc
    if isinstance(data, dict):
        missing = [n for n in layer_names if n not in data]
        if missing:
            raise MoeSlimError(f"budget file {p} gives no count for layer {missing[0]}")
        data = [data[n] for n in layer_names]
    if not isinstance(data, list) or len(data) != len(layer_names) or not all(isinstance(c, int) for c in data):
        raise MoeSlimError(f"budget file {p} must list one integer count per MoE layer ({len(layer_names)} layers)")
    return list(data)


def select(scores: torch.Tensor, counts: list[int], groups: int = 1) -> list[list[int]]:
    """Top-``count`` experts per layer by score (ties: lower index); equal per group when grouped."""
    L, E = scores.shape
    keep: list[list[int]] = []
    for l in range(L):
        s = scores[l].double()
        if groups > 1:
            size = E // groups
            per = counts[l] // groups
            chosen: list[int] = []
            for g in range(groups):
                idx = list(range(g * size, (g + 1) * size))
                idx.sort(key=lambda i: (-float(s[i]), i))
                chosen += idx[:per]
        else:
            idx = list(range(E))
            idx.sort(key=lambda i: (-float(s[i]), i))
            chosen = idx[: counts[l]]
        keep.append(sorted(chosen))
    return keep


def make_plan(
    scores: torch.Tensor,
    *,
    family: Family,
    config: Any,
    layer_names: list[str],
    ratio: float | None = None,
    budget: str = "uniform",
    floor: int | None = None,
    info: dict[str, Any] | None = None,
) -> ExpertPlan:
    """Turn scores into a plan under a budget; one-line errors for impossible budgets."""
    L, E = scores.shape
    top_k = family.top_k(config)
    groups = family.groups(config)
    n_group = groups[0] if groups else 1
    if budget == "uniform":
        if ratio is None:
            raise MoeSlimError("a uniform budget needs --ratio")
        counts = uniform_counts(L, E, ratio)
    elif budget == "global":
        if ratio is None:
            raise MoeSlimError("a global budget needs --ratio")
        fl = max(top_k, floor if floor is not None else top_k)
        if n_group > 1:
            fl = -(-fl // n_group) * n_group
        counts = global_counts(scores, ratio, fl, n_group)
    else:
        counts = explicit_counts(budget, layer_names)
    for name, c in zip(layer_names, counts):
        if c < top_k:
            raise MoeSlimError(
                f"this budget leaves {c} experts in {name}, fewer than top-k={top_k} (use a smaller ratio)"
            )
        if c > E:
            raise MoeSlimError(f"this budget keeps {c} experts in {name}, which has only {E}")
        why = group_size_ok(family, config, c)
        if why:
            raise MoeSlimError(f"cannot prune {name} to {c} experts: {why}")
    keep = select(scores, counts, n_group)
    layers = [LayerPlan(n, k, [round(float(x), 8) for x in scores[i].tolist()]) for i, (n, k) in enumerate(zip(layer_names, keep))]
    return ExpertPlan(family.name, E, top_k, layers, info=dict(info or {}, budget=budget if budget in ("uniform", "global") else str(budget), ratio=ratio))
