"""Run a recipe: observe (or reuse statistics) -> prune or merge -> optional SFT -> evaluate -> checkpoint.

Each step is the public API call the corresponding command makes, into a work directory beside the
output (``.OUT.run/``): a rerun after an interruption reuses finished steps' outputs there. The
final checkpoint appears at OUT atomically, with ``recipe.yaml``, ``results.json`` (when the recipe
evaluates) and its model card extended by the recipe and the scores; the work directory is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..api import merge_checkpoint, observe_checkpoint, prune_checkpoint, sft_checkpoint
from ..checkpoint.cards import with_evaluation
from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..modeling.hub import resolve_model
from ..outputs import MARKER, atomic_dir, check_output, is_moe_slim_output, note
from .spec import Recipe, recipe_of


def _done(path: Path) -> bool:
    """A step's output from an earlier, interrupted run of the same recipe."""
    return path.is_dir() and is_moe_slim_output(path)


def _drop_if_unfinished(work: Path) -> None:
    """After a refusal: remove the work directory when no step finished in it (nothing to resume), else say
    where the finished steps wait for a rerun."""
    if any(_done(p) for p in work.iterdir()):
        note(f"the finished steps are kept in {work} for a rerun of the same recipe (remove it with: rm -r {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)


def run_recipe(recipe: Recipe, raw: dict[str, Any], out: str | os.PathLike, *, recipe_path: str | None = None,
               overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None
               ) -> dict[str, Any]:
    """Run ``recipe`` and write its checkpoint to ``out``; return what each step produced."""
    say = log or (lambda msg: None)
    model = resolve_model(recipe.model)
    data_dir = data_dir_or_default(recipe.data_dir)
    out = Path(out)
    check_output(out, overwrite, inputs=[model, recipe.stats, data_dir, recipe_path], kind="checkpoint")
    if recipe.stats is not None and not Path(recipe.stats).is_dir():
        raise MoeSlimError(f"recipe: stats {recipe.stats} is not a directory (run observe, or give an observe step)")
    work = out.parent / f".{out.name}.run"
    key = json.dumps(raw, sort_keys=True, default=str)
    if work.is_dir() and (not (work / "recipe.json").is_file() or (work / "recipe.json").read_text() != key):
        shutil.rmtree(work)  # another recipe's leftovers: nothing there can be reused
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(key)
    try:
        steps: dict[str, Any] = {}

        stats: str | None = recipe.stats
        if stats is None and recipe.observe is not None:
            stats_dir = work / "stats"
            if not _done(stats_dir):
                o = recipe.observe
                say(f"observe: {o.calib}")
                observe_checkpoint(model, o.calib, stats_dir, seq_len=o.seq_len, batch_size=o.batch_size,
                                   max_tokens=o.max_tokens, data_dir=data_dir, samples=o.samples or 0,
                                   layerwise=o.layerwise, device=recipe.device, progress=progress, overwrite=True)
            stats = str(stats_dir)
        steps["stats"] = stats

        slim = work / "slim"
        if not _done(slim):
            if recipe.prune is not None:
                p = recipe.prune
                say(f"prune: {p.criterion} ratio {p.ratio}")
                plan = prune_checkpoint(model, stats, slim, criterion=p.criterion, ratio=p.ratio, mix=p.mix,
                                        reference=p.reference, budget=p.budget, floor=p.floor, seed=p.seed,
                                        dtype=recipe.dtype, progress=progress, overwrite=True)
            else:
                m = recipe.merge
                say(f"merge: {m.method} ratio {m.ratio}")
                sequential = m.resolved().sequential
                plan = merge_checkpoint(model, slim, method=m, ratio=m.ratio, stats_path=stats,
                                        calib=recipe.observe.calib if sequential and recipe.observe else None,
                                        mix=m.mix, data_dir=data_dir, dtype=recipe.dtype, device=recipe.device,
                                        overwrite=True, log=log)
            steps["kept_per_layer"] = plan.kept_counts
        final = slim

        if recipe.recover is not None:
            healed = work / "healed"
            if not _done(healed):
                stage = recipe.recover["sft"]
                say(f"sft: {stage.steps} steps on {stage.data} ({stage.loss})")
                result = sft_checkpoint(slim, healed, data=stage.data, dtype=recipe.dtype, device=recipe.device,
                                        data_dir=data_dir, progress=progress, overwrite=True, merge_lora=True,
                                        teacher=model if stage.loss != "ce" else None, **stage.sft_kwargs())
                steps["sft"] = {"before": result.metrics_before, "after": result.metrics_after, "steps": result.steps,
                                "loss": result.loss, **({"teacher": result.teacher} if result.teacher else {})}
            final = healed

        results = None
        if recipe.eval is not None:
            from ..evals.run import evaluate
            from ..modeling.loading import load_model

            e = recipe.eval
            say(f"eval: {e.suite} {e.tasks or ''}")
            m_, tok = load_model(final, device=recipe.device if recipe.device != "auto" else None)
            results = evaluate(m_, tok, e.suite, tasks=e.tasks, limit=e.limit, batch_size=e.batch_size,
                               data_dir=data_dir, translation_testset=e.translation_testset, hash_weights=False,
                               split=e.split)
            steps["metrics"] = results["metrics"]

    except MoeSlimError:
        _drop_if_unfinished(work)
        raise
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in final.iterdir():
            if f.is_file() and f.name != MARKER:
                shutil.copy2(f, tmp / f.name)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        if results is not None:
            (tmp / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
        (tmp / "README.md").write_text(run_card(slim, final if final != slim else None, raw, results))
    shutil.rmtree(work, ignore_errors=True)
    return steps


def run_card(slim: Path, healed: Path | None, raw: dict[str, Any], results: dict[str, Any] | None) -> str:
    """The card of the whole recipe: the prune or merge card (whose source is the recipe's model), the
    SFT stage's training and metrics (not its card, whose source is the temporary pruned checkpoint),
    the recipe itself and the evaluation."""
    card = (slim / "README.md").read_text().rstrip("\n")
    if healed is not None:
        sft = (healed / "README.md").read_text()
        body = sft[sft.find("## Training"):sft.find("Training log:")].strip()
        card += "\n\n## Recovery (SFT)\n\n" + body.replace("## Training", "### Training").replace(
            "## Metrics", "### Metrics")
    card += "\n\n" + recipe_section(raw)
    return with_evaluation(card, results) if results is not None else card


def oneshot(recipe: dict[str, Any] | str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
            overwrite: bool = False, progress: bool = False, log: Callable[[str], None] | None = None
            ) -> dict[str, Any]:
    """One call for a whole recipe, as llm-compressor's ``oneshot``: ``recipe`` is a dict or a YAML path.

    ``model`` (a directory or Hub id) replaces the recipe's; the steps, the work directory and the
    output are those of ``moe-slim run`` (:func:`run_recipe`), which this returns the result of."""
    path = None if isinstance(recipe, dict) else str(recipe)
    if model is not None:
        recipe = {**(recipe if isinstance(recipe, dict) else recipe_of(recipe)[1]), "model": str(model)}
    spec, raw = recipe_of(recipe)
    return run_recipe(spec, raw, out, recipe_path=path, overwrite=overwrite, progress=progress, log=log)


def recipe_section(raw: dict[str, Any]) -> str:
    """The card's record of the recipe that made the checkpoint (local paths by their last part: the card is
    published, the directories of the machine that ran it are not)."""
    text = re.sub(r"(?<![\w.~])/(?:[^\s,'\"=/]+/)*([^\s,'\"=/]+)", r"\1", yaml.safe_dump(raw, sort_keys=False))
    lines = ["## Recipe", "", "Made with `moe-slim run recipe.yaml` (the file is beside this card; local paths are "
             "shown by their names):", "", "```yaml", text.rstrip(), "```", ""]
    return "\n".join(lines)
