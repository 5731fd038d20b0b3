"""Writing slimmed checkpoints: standard files, a model card, the plan beside them, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import MoeSlimError
from .fingerprint import library_versions, model_fingerprint
from .outputs import atomic_dir
from .plan import ExpertPlan


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    card: str,
    plan: ExpertPlan | None = None,
    extra_json: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save model, tokenizer, generation config, model card and plan into ``out``, atomically."""
    if plan is not None:
        require_writable(plan)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if plan is not None:
            (tmp / "plan.json").write_text(plan.to_json())
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(card)
    return Path(out)


def require_writable(plan: ExpertPlan) -> None:
    """Plans with different counts per layer cannot be expressed in a transformers config."""
    if not plan.uniform:
        raise MoeSlimError(
            f"this plan keeps different expert counts per layer ({sorted(set(plan.kept_counts))}); transformers "
            "configs hold one count, so it cannot be written as a standard checkpoint "
            "(use --budget uniform, or evaluate the model in memory)"
        )


def prune_card(
    *,
    source: str,
    plan: ExpertPlan,
    params_before: int,
    params_after: int,
    model: nn.Module,
    stats_info: dict[str, Any] | None = None,
) -> str:
    """A model card saying what was removed, from which statistics and mix, and the sizes."""
    info = plan.info
    fmt = lambda m: ",".join(f"{k}={v:g}" for k, v in m.items()) if isinstance(m, dict) else m  # noqa: E731
    removed = [sorted(set(range(plan.num_experts)) - set(l.keep)) for l in plan.layers]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe_slim, expert-pruning, mixture-of-experts]",
        "---",
        f"# {Path(str(source)).name} — {plan.kind}d with moe_slim",
        "",
        f"Source checkpoint: `{source}` ({plan.family}, {plan.num_experts} experts per layer, top-{plan.top_k}).",
        "",
        "## What was removed",
        f"- Criterion: `{info.get('criterion', 'explicit plan')}`; budget: `{info.get('budget')}`; "
        f"ratio: {info.get('ratio')}",
        f"- Calibration mix: `{fmt(info.get('mix')) or 'all observed domains'}`"
        + (f"; reference mix: `{fmt(info['reference'])}`" if info.get("reference") else ""),
        f"- Experts kept per layer: {plan.kept_counts}",
        f"- Parameters: {params_before:,} before, {params_after:,} after "
        f"({100.0 * (1 - params_after / max(params_before, 1)):.1f}% fewer)",
        "",
        "| layer | kept | removed |",
        "|---|---|---|",
    ]
    for lp, rm in zip(plan.layers, removed):
        lines.append(f"| `{lp.name}` | {lp.keep} | {rm} |")
    if stats_info:
        lines += [
            "",
            "## Statistics",
            f"- Domains and tokens: {stats_info.get('tokens_per_domain')}",
            f"- Gathered on: `{stats_info.get('model_path')}` (fingerprint {stats_info.get('model_fingerprint', {}).get('config_hash')})",
            f"- Sequence length: {stats_info.get('seq_len')}",
        ]
    lines += [
        "",
        "## Reproduce",
        "The plan is in `plan.json` beside this card: "
        f"`moe-slim apply {source} --plan plan.json --out OUT` reapplies it without the statistics.",
        "",
        f"Fingerprint of this checkpoint: `{model_fingerprint(model)}`.",
        f"Libraries: `{library_versions()}`.",
        "",
    ]
    return "\n".join(lines)
