"""The recipe schema: a YAML mapping checked completely (pydantic) before any work.

    model: models/reference            # a checkpoint directory or a Hugging Face Hub id
    data_dir: data                     # built data (default: $MOE_SLIM_DATA, ./data, the checkout's data/)
    stats: runs/stats                  # reuse saved statistics ... or observe them:
    observe: {calib: "translation=1,general=1@64k", seq_len: 256, batch_size: 8, samples: 32k}
    prune: {criterion: reap, ratio: 0.5, mix: {translation: 1}}     # exactly one of prune and merge
    merge: {method: ream, ratio: 0.5, mix: {translation: 1}}        # any MergeOptions field; method: or a preset
    recover: {sft: {steps: 200, mix: "translation=0.8,general=0.2", mode: experts}}   # optional
    eval: {suite: quick, limit: 100}                                 # optional
    dtype: auto                        # of the written weights (auto: the source's)
    device: auto                       # where models run
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

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


class ObserveStep(Strict):
    calib: str
    seq_len: SeqLen = 512
    batch_size: PositiveInt = 8
    max_tokens: Tokens | None = None
    samples: Tokens | None = None
    layerwise: bool | None = None


class PruneStep(Strict):
    criterion: str = "reap"
    ratio: float | None = Field(None, gt=0, lt=1)
    mix: dict[str, float] | None = None
    reference: dict[str, float] | None = None
    budget: str = "uniform"
    floor: PositiveInt | None = None
    seed: NonNegativeInt = 0


class MergeStep(MergeOptions):
    """Every :class:`~moe_slim.experts.merge.config.MergeOptions` field (``method``: a method or a preset
    such as ``ream-repo``), plus the ratio and the calibration mix."""

    ratio: float = Field(gt=0, lt=1)
    mix: dict[str, float] | None = None


class Recipe(Strict):
    model: str
    data_dir: str | None = None
    stats: str | None = None
    observe: ObserveStep | None = None
    prune: PruneStep | None = None
    merge: MergeStep | None = None
    recover: dict[str, SftStage] | None = None
    eval: EvalSettings | None = None
    dtype: str = "auto"
    device: str = "auto"

    @model_validator(mode="after")
    def _one_of_each(self) -> Recipe:
        if (self.prune is None) == (self.merge is None):
            raise ValueError("a recipe has exactly one of 'prune' and 'merge'")
        if self.stats is None and self.observe is None and not (self.merge and self.merge.resolved().sequential):
            raise ValueError("give 'stats' (a saved statistics directory) or an 'observe' step")
        if self.recover is not None and set(self.recover) != {"sft"}:
            raise ValueError(f"recover must be {{sft: {{steps: N, ...}}}} (got keys {sorted(self.recover)})")
        return self


def load_recipe(path: str | Path) -> tuple[Recipe, dict[str, Any]]:
    """The checked recipe and the mapping it was read from; one-line errors."""
    raw = read_yaml(path, "recipe")
    return validate(Recipe, raw, "recipe"), raw


def recipe_of(recipe: dict[str, Any] | str | Path) -> tuple[Recipe, dict[str, Any]]:
    """A recipe given as a mapping (checked the same way) or as the path of its YAML file."""
    if isinstance(recipe, dict):
        raw = dict(recipe)
        return validate(Recipe, raw, "recipe"), raw
    return load_recipe(recipe)
