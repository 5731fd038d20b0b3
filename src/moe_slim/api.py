"""The Python API behind ``moe-slim observe | prune | apply``: checkpoint in, checkpoint out.

Each function validates everything it can before any heavy work and writes nothing on error.
In-memory building blocks live in :mod:`observe`, :mod:`criteria`, :mod:`plan` and :mod:`prune`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .checkpoint import prune_card, require_writable, save_checkpoint
from .criteria import ALL_CRITERIA, score
from .errors import MoeSlimError
from .families import check_uniform, family_of, moe_layers
from .loading import load_config, load_model
from .observe import observe
from .outputs import check_output
from .plan import ExpertPlan, check_ratio, make_plan
from .prune import apply_plan, count_parameters
from .stats import RouterStats


def observe_checkpoint(
    model_path: str | os.PathLike,
    calib: str | dict[str, list[str]],
    out: str | os.PathLike,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | dict[str, int] | None = None,
    pack: bool = True,
    device_map: str | None = None,
    data_dir: str = "data",
    overwrite: bool = False,
    progress: bool = True,
    samples: int = 0,
) -> RouterStats:
    """Observe a checkpoint on calibration text (a spec string or texts per domain) and save the stats.

    ``samples=N`` also keeps up to N tokens per domain and MoE layer for expert merging.
    """
    check_output(out, overwrite)
    family_of(load_config(model_path))  # unsupported family: fail before loading weights
    texts, budget = _calibration(calib, data_dir)
    if max_tokens is None:
        max_tokens = budget
    model, tok = load_model(model_path, device_map=device_map)
    if tok is None:
        raise MoeSlimError(f"{model_path} has no tokenizer; observation needs one to read calibration text")
    stats = observe(model, tok, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, pack=pack,
                    progress=progress, samples=samples)
    stats.meta["model_path"] = str(model_path)
    stats.meta["calibration"] = calib if isinstance(calib, str) else "in-memory"
    stats.save(out, overwrite=overwrite)
    return stats


def calibration_texts(calib: str | dict[str, list[str]], data_dir: str = "data") -> tuple[dict[str, list[str]], Any]:
    """Texts per domain from a calibration spec (or a dict of texts), and the spec's token budget per domain."""
    return _calibration(calib, data_dir)


def _calibration(calib: str | dict[str, list[str]], data_dir: str) -> tuple[dict[str, list[str]], Any]:
    if isinstance(calib, dict):
        for d, texts in calib.items():
            if not texts:
                raise MoeSlimError(f"calibration domain '{d}' has no text")
        return calib, None
    from .data.calib import load_calibration

    cal = load_calibration(calib, data_dir=data_dir)
    budget = None
    if getattr(cal, "tokens", None):
        weights = cal.weights or {d: 1.0 for d in cal.texts}
        total = sum(weights.values())
        budget = {d: int(cal.tokens * w / total) for d, w in weights.items()}
    return cal.texts, budget


def plan_for(
    model: nn.Module,
    stats: RouterStats,
    *,
    criterion: str = "reap",
    ratio: float | None = None,
    mix: dict[str, float] | None = None,
    reference: dict[str, float] | None = None,
    budget: str = "uniform",
    floor: int | None = None,
    seed: int = 0,
) -> ExpertPlan:
    """Score experts on ``mix`` and turn the scores into a plan for ``model``."""
    if criterion not in ALL_CRITERIA:
        raise MoeSlimError(f"unknown criterion '{criterion}' (choose from: {', '.join(ALL_CRITERIA)})")
    if ratio is not None:
        check_ratio(ratio)
    stats.check_model(model)
    layers = moe_layers(model)
    scores = score(stats, criterion, mix=mix, reference=reference, seed=seed)
    info = {"criterion": criterion, "mix": mix, "reference": reference, "seed": seed,
            "stats_fingerprint": stats.meta.get("model_fingerprint"), "stats_domains": list(stats.domains)}
    return make_plan(scores, family=layers[0].family, config=model.config, layer_names=[l.name for l in layers],
                     ratio=ratio, budget=budget, floor=floor, info=info)


def prune_checkpoint(
    model_path: str | os.PathLike,
    stats_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    criterion: str = "reap",
    ratio: float = 0.5,
    mix: dict[str, float] | None = None,
    reference: dict[str, float] | None = None,
    budget: str = "uniform",
    floor: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> ExpertPlan:
    """Prune a checkpoint with saved statistics and write the result (plan.json and card beside it)."""
    check_output(out, overwrite)
    if criterion not in ALL_CRITERIA:
        raise MoeSlimError(f"unknown criterion '{criterion}' (choose from: {', '.join(ALL_CRITERIA)})")
    check_ratio(ratio)
    family_of(load_config(model_path))
    stats = RouterStats.load(stats_path)
    model, tok = load_model(model_path)
    plan = plan_for(model, stats, criterion=criterion, ratio=ratio, mix=mix, reference=reference, budget=budget,
                    floor=floor, seed=seed)
    plan.info["stats_path"] = str(stats_path)
    _write(model, tok, plan, model_path, out, overwrite, stats.meta)
    return plan


def apply_checkpoint(
    model_path: str | os.PathLike, plan_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> ExpertPlan:
    """Apply a saved plan to a checkpoint (no statistics needed).

    A merge plan (kind ``merge``) is replayed by :func:`moe_slim.merge.merge_checkpoint`, with the
    neuron permutations saved beside it.
    """
    check_output(out, overwrite)
    plan = ExpertPlan.load(plan_path)
    if plan.kind == "merge":
        from .merge import merge_checkpoint

        return merge_checkpoint(model_path, out, plan_path=plan_path, overwrite=overwrite)
    family_of(load_config(model_path))
    model, tok = load_model(model_path)
    _write(model, tok, plan, model_path, out, overwrite, None)
    return plan


def _write(model: nn.Module, tok: Any, plan: ExpertPlan, source: Any, out: Any, overwrite: bool,
           stats_meta: dict[str, Any] | None) -> None:
    check_uniform(moe_layers(model))
    before = count_parameters(model)
    require_writable(plan)  # refuse before any slicing work
    apply_plan(model, plan)
    after = count_parameters(model)
    plan.info.update(params_before=before, params_after=after)
    card = prune_card(source=str(source), plan=plan, params_before=before, params_after=after, model=model,
                      stats_info=stats_meta)
    save_checkpoint(model, tok, out, card=card, plan=plan, overwrite=overwrite)


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``translation=3,general=1`` -> ``{"translation": 3.0, "general": 1.0}``."""
    if text is None or text == "":
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            out[name.strip()] = 1.0
            continue
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise MoeSlimError(f"mix weight '{part}' is not NAME=NUMBER") from exc
    if any(v < 0 for v in out.values()) or sum(out.values()) <= 0:
        raise MoeSlimError(f"mix weights must be non-negative and not all zero (got '{text}')")
    return out
