"""The merge plan (kind ``merge``): groups with the representative first, weights, scores and a hash
of each layer's neuron permutations, which are saved beside it in ``merge_permutations.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import MoeSlimError
from ...families import (
    MoeLayer,
    family_of,
    group_size_ok,
    moe_layers,
)
from ..plan import PLAN_FORMAT, ExpertPlan, LayerPlan, read_plan_json

PERMUTATIONS_FILE = "merge_permutations.safetensors"


# -- plans ------------------------------------------------------------------------------------


@dataclass
class MergeLayerPlan(LayerPlan):
    """One layer: ``keep`` lists the representatives (whose router rows survive), in output order."""

    groups: list[list[int]] = field(default_factory=list)  # per merged expert: members, representative first
    weights: list[list[float]] = field(default_factory=list)  # merge weights, same order, sum to 1
    permutations_sha256: str = ""  # hash of this layer's permutations ("" = identity, no alignment)


@dataclass
class MergePlan(ExpertPlan):
    """Which experts merge into which, with what weights; JSON beside the checkpoint (kind ``merge``).

    ``permutations`` (not in the JSON; in ``merge_permutations.safetensors``) maps a layer index to
    an ``[E, I]`` tensor: row ``m`` is the neuron order that aligns expert ``m`` to its group's
    representative (aligned = expert's neurons taken in that order).
    """

    kind: str = "merge"
    permutations: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def check_writable(self) -> None:
        if not self.info.get("tied"):  # a tied merge keeps every expert: any group counts write as a checkpoint
            super().check_writable()

    def to_json(self) -> str:
        d = self.as_dict()
        d.pop("permutations", None)
        return json.dumps(d, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergePlan:
        if d.get("format") != PLAN_FORMAT or d.get("kind") != "merge":
            raise MoeSlimError(f"not a moe_slim merge plan (format {d.get('format')!r}, kind {d.get('kind')!r})")
        try:
            layers = [MergeLayerPlan(l["name"], [int(i) for i in l["keep"]], [float(s) for s in l.get("scores", [])],
                                     [[int(i) for i in g] for g in l["groups"]],
                                     [[float(w) for w in ws] for ws in l["weights"]],
                                     str(l.get("permutations_sha256", ""))) for l in d["layers"]]
            return cls(d["family"], int(d["num_experts"]), int(d["top_k"]), layers, "merge", d.get("info", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise MoeSlimError(f"merge plan is malformed: missing or bad field {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike) -> MergePlan:
        """Read ``plan.json`` and the permutations file beside it (checked against the plan's hashes)."""
        p = Path(path)
        plan = cls.from_dict(read_plan_json(p))
        need = [i for i, l in enumerate(plan.layers) if l.permutations_sha256]
        if need:
            pf = p.parent / PERMUTATIONS_FILE
            if not pf.is_file():
                raise MoeSlimError(f"merge plan {p} aligns neurons but {pf.name} is not beside it "
                                   "(copy it from the merged checkpoint)")
            perms = {int(k): v for k, v in load_file(str(pf)).items()}
            for i in need:
                if i not in perms or _sha(perms[i]) != plan.layers[i].permutations_sha256:
                    raise MoeSlimError(f"{pf.name} does not match the plan (layer {plan.layers[i].name}); "
                                       "use the files written together")
            plan.permutations = {i: perms[i] for i in need}
        return plan

    def save_permutations(self, path: str | os.PathLike) -> None:
        if self.permutations:
            save_file({str(i): t.to(torch.int32).contiguous() for i, t in self.permutations.items()}, str(path))

    def write_files(self, directory: str | os.PathLike) -> None:
        """``plan.json`` and the neuron permutations (``merge_permutations.safetensors``) beside it."""
        super().write_files(directory)
        self.save_permutations(Path(directory) / PERMUTATIONS_FILE)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def validate_merge_plan(plan: MergePlan, model: nn.Module) -> list[MoeLayer]:
    """One-line errors for a merge plan that does not fit ``model``; the model's MoE layers otherwise."""
    family = family_of(model)
    layers = moe_layers(model)
    if plan.family != family.name:
        raise MoeSlimError(f"plan is for family {plan.family}; this model is {family.name}")
    if [l.name for l in layers] != [l.name for l in plan.layers]:
        raise MoeSlimError("plan names other MoE layers than this model has (make the plan on this model)")
    n_now = {l.num_experts for l in layers}
    if n_now != {plan.num_experts}:
        raise MoeSlimError(f"plan was made for {plan.num_experts} experts per layer; this model has {sorted(n_now)} "
                           "(merge the original model)")
    counts = {len(l.groups) for l in plan.layers}
    if not plan.info.get("tied"):  # a tied merge keeps every expert (and router row): any group counts work
        if len(counts) != 1:
            raise MoeSlimError(f"merge plan has different expert counts per layer ({sorted(counts)})")
        k = counts.pop()
        why = group_size_ok(family, model.config, k)
        if k < family.top_k(model.config) or why:
            raise MoeSlimError(f"merge plan keeps {k} experts per layer, which this router cannot use "
                               f"({why or 'top-k'})")
    for li, l in enumerate(plan.layers):
        flat = sorted(m for g in l.groups for m in g)
        if flat != list(range(plan.num_experts)) or [g[0] for g in l.groups] != l.keep:
            raise MoeSlimError(f"merge plan for {l.name} does not split the {plan.num_experts} experts into groups")
        if [len(w) for w in l.weights] != [len(g) for g in l.groups]:
            raise MoeSlimError(f"merge plan for {l.name} has weights that do not match its groups")
        if l.permutations_sha256 and li not in plan.permutations:
            raise MoeSlimError(f"merge plan for {l.name} needs its neuron permutations ({PERMUTATIONS_FILE})")
    return layers
