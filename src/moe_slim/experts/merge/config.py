"""One validated object for every choice a merge makes, and each reference's defaults as a named preset.

:class:`MergeOptions` is what the CLI (``moe-slim merge``), the recipe's ``merge:`` section, the sweep
spec's ``merge:`` section and :func:`~.driver.merge_model` all build, as llm-compressor's modifiers are
one validated object per method. ``method`` names a method (``ream``, ``hc-smoe``, ``m-smoe``,
``average``: moe_slim's defaults) or a preset that follows a reference exactly:

==================  ============================================================================
preset              what it fixes
==================  ============================================================================
``ream-repo``       REAM's repository defaults (SamsungSAILMontreal/ream, ``merge.py``/``ream/merger.py``):
                    centroids and merge weights by the routed-token p²·‖f‖ saliency
                    (``saliency='reap'``), one PCA per layer on row-normalised neuron vectors
                    projected onto V·diag(s), C = 16, sequential. Its README: "Default arguments
                    correspond to our full REAM model", so ``ream-paper`` is the same preset.
``hc-smoe-paper``   HC-SMoE as published: average linkage on mean outputs, frequency-weighted, no
                    alignment, every member bound to the merged expert (``tied``), the router untouched.
``m-smoe-paper``    M-SMoE as published: dominants by frequency ranked across layers, weight-matching
                    alignment, frequency-weighted, ``tied``.
==================  ============================================================================

A field left ``None`` takes the method's (or the preset's) value; a value given explicitly wins over
the preset's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError, model_validator

from ...errors import MoeSlimError
from ...schema import NonNegativeInt, PositiveInt, Strict, Tokens, one_line
from .methods import DEFAULT_ALIGN_TOKENS, DEFAULT_SAMPLE_TOKENS, METHODS, method_spec

Weighting = Literal["saliency", "p2norm-routed", "p2norm-all", "frequency", "uniform"]
Centroids = Literal["reap", "p2norm-routed", "p2norm-all"]

PRESETS: dict[str, dict[str, Any]] = {
    "ream-repo": dict(method="ream", weighting="p2norm-routed", centroids="p2norm-routed", pca="layer",
                      group_size=16, sequential=True),
    "ream-paper": dict(method="ream", weighting="p2norm-routed", centroids="p2norm-routed", pca="layer",
                       group_size=16, sequential=True),
    "hc-smoe-paper": dict(method="hc-smoe", tied=True, router_row="method"),
    "m-smoe-paper": dict(method="m-smoe", tied=True, global_dominants=True, dominants="frequency"),
}
NAMES: tuple[str, ...] = (*METHODS, *PRESETS)


class MergeOptions(Strict):
    """Every choice of a merge (see the module docstring for presets; :mod:`.options` for ours)."""

    method: str = "ream"
    preset: str | None = None  # set by resolved(): the preset ``method`` named
    grouping: Literal["ream", "hc", "msmoe"] | None = None
    align: Literal["ream", "weights", "none"] | None = None
    weighting: Weighting | None = None
    centroids: Centroids | None = None  # REAM: the saliency that ranks centroids (and orders groups)
    router_row: Literal["frequency", "saliency", "method"] | None = None
    dominants: Literal["frequency", "saliency"] = "frequency"
    global_dominants: bool = False
    group_size: PositiveInt | None = None  # REAM's C; None: default_group_size
    pca: Literal["layer", "pair", "off"] | None = None
    pca_dims: NonNegativeInt = 64
    tied: bool = False
    sequential: bool = False
    protect_super: bool = False
    max_tokens: Tokens = DEFAULT_SAMPLE_TOKENS
    align_tokens: Tokens = DEFAULT_ALIGN_TOKENS
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _check(self) -> MergeOptions:
        if self.method not in NAMES:
            raise ValueError(f"unknown merge method '{self.method}' (choose from: {', '.join(NAMES)})")
        return self

    @classmethod
    def build(cls, method: str | MergeOptions | None = None, **choices: Any) -> MergeOptions:
        """Options from a method or preset name (or options) and explicit choices (``None``: not given)."""
        given = {k: v for k, v in choices.items() if v is not None}
        if isinstance(method, MergeOptions):  # a subclass (a recipe's merge step) brings only the options' fields
            base = method.model_dump(exclude_unset=True, include=set(MergeOptions.model_fields))
        else:
            base = {"method": method or "ream"}
        base.update(given)
        try:
            return cls(**base)
        except ValidationError as exc:
            raise one_line(exc, "merge options", cls) from None

    def resolved(self) -> MergeOptions:
        """Every ``None`` filled: the preset's values under the explicit ones, then the method's defaults."""
        fields = self.model_dump(exclude_unset=True, include=set(MergeOptions.model_fields))
        preset = dict(PRESETS.get(self.method, {}))
        preset.update({k: v for k, v in fields.items() if k != "method"})
        preset.setdefault("method", self.method)
        if self.method in PRESETS:
            preset["preset"] = self.method
        opts = MergeOptions(**preset)
        spec = method_spec(opts.method, opts.grouping)
        ream = spec.grouping == "ream"
        fill = dict(grouping=spec.grouping, align=spec.align, weighting=spec.weighting,
                    centroids=opts.centroids or ("reap" if ream else None),
                    router_row=opts.router_row or ("saliency" if ream else "frequency"),
                    pca=opts.pca or ("pair" if opts.pca_dims and spec.align == "ream" else "off"))
        out = opts.model_copy(update={k: getattr(opts, k) or v for k, v in fill.items()})
        if out.global_dominants and not (out.tied and out.grouping == "msmoe"):
            raise MoeSlimError("global dominants give each layer its own expert count, which only a tied M-SMoE merge "
                               "keeps loadable (use method m-smoe with tied)")
        if out.pca != "off" and out.pca_dims == 0:
            out = out.model_copy(update={"pca": "off"})
        return out

    def describe(self) -> dict[str, Any]:
        """The resolved choices as the plan and the card record them."""
        return self.model_dump()
