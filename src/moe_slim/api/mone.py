"""``moe-slim mone``: MoNE (novices for the experts that matter least), written in vLLM's
expert-substitution format, or as the nearest standard checkpoint (``standard=True``)."""

from __future__ import annotations

import os

import torch

from ..errors import MoeSlimError
from ..checkpoint.cards import prune_card
from ..checkpoint.substitution import SUBSTITUTION_NOTE, write_mone_checkpoint
from ..experts.mone import NovicePlan, check_novices, novice_plan
from ..experts.prune import count_parameters
from ..experts.stats import RouterStats
from ..families import family_of, moe_layers
from ..modeling.hub import resolve_model
from ..modeling.loading import load_config, load_model, parse_dtype
from ..modeling.mtp import check_mtp_writable
from ..outputs import check_output
from .plans import plan_for


def mone_checkpoint(
    model_path: str | os.PathLike,
    stats_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ratio: float,
    mix: dict[str, float] | None = None,
    standard: bool = False,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    protect_super: bool = False,
    drop_mtp: bool = False,
) -> NovicePlan:
    """Keep the top ``1 - ratio`` experts of every layer by the ``mone`` criterion, replace the others by
    their mean outputs (novices) and write the checkpoint (see :mod:`moe_slim.checkpoint.substitution`)."""
    model_path = resolve_model(model_path)
    check_output(out, overwrite, inputs=[model_path, stats_path], kind="checkpoint")
    check_novices(family_of(load_config(model_path)))
    stats = RouterStats.load(stats_path)
    save_dtype = parse_dtype(dtype)  # None: each tensor written in its own source dtype
    model, tok = load_model(model_path, dtype=torch.float32)
    check_mtp_writable(model, model_path, drop=drop_mtp)
    plan = plan_for(model, stats, criterion="mone", ratio=ratio, mix=mix, protect_super=protect_super)
    if all(len(lp.keep) == plan.num_experts for lp in plan.layers):
        raise MoeSlimError(f"--ratio {ratio:g} of {plan.num_experts} experts rounds to no novice in any layer "
                           f"(a ratio above {0.5 / plan.num_experts:.3g} makes at least one); nothing written")
    plan.info.update(method="mone", stats_path=str(stats_path), standard=standard)
    nplan = novice_plan(plan, stats, mix)
    before = count_parameters(model)
    E = plan.num_experts
    dropped = sum(sum(p.numel() for p in layer.experts.parameters()) * (E - len(lp.keep)) // E
                  for layer, lp in zip(moe_layers(model), plan.layers))
    card = prune_card(source=str(model_path), plan=plan, params_before=before, params_after=before - dropped,
                      model=model, stats_info=stats.meta)
    card = card.replace("prune" + "d with moe_slim", "MoNE (novices) with moe_slim", 1)
    if not standard:
        card += "\n## Format\n\n" + SUBSTITUTION_NOTE + "\n"
    write_mone_checkpoint(model, tok, out, nplan, card=card, standard=standard, dtype=save_dtype, overwrite=overwrite,
                          drop_mtp=drop_mtp, source=model_path)
    return nplan

