"""Every plan measured as a model: probe retention (a), the model's own outputs (b, the headline), and the
same after an equal healing run; paired bootstrap differences of ProbScale against each baseline.

    >>> table = compare_methods(model, tok, selections, measurer=m, own=OwnOutputs(tok, "decoder", "data"),
    ...                         heal_steps=40, heal_kwargs={"data_dir": "data"})

Each plan is slimmed from a fresh copy of the original (healing trains a copy; the original is the
teacher and stays untouched). Every method gets the same healing: steps, data, learning rate, seed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from .measure import OwnOutputs, paired_difference, retention, score_log
from .select import Selection
from .slim import slim_model

PRIMARY = "probscale-contiguous"


def _entry(sel: Selection) -> dict[str, Any]:
    return {"keep": sel.keep, "params": sel.params, "fraction": sel.fraction, "reduction": sel.total / sel.params,
            "equal_size": sel.meta.get("equal_size", True)}


def compare_methods(model: Any, tokenizer: Any, selections: dict[str, Selection], *, measurer: Any = None,
                    own: OwnOutputs | None = None, full_scores: dict[str, Any] | None = None, heal_steps: int = 0,
                    heal_kwargs: dict[str, Any] | None = None, primary: str = PRIMARY, bootstrap_samples: int = 2000,
                    seed: int = 0, log: Callable[[str], None] = lambda m: None, probe_healed: bool = True,
                    on_method: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every selection; returns ``{"methods": {name: {...}}, "full": {...}, "differences": {...}}``.

    ``measurer``: a :class:`~moe_slim.dense.pipeline.Measurer` for the probe retention (a) (skipped when
    None). ``own``: an :class:`OwnOutputs` for the model's own outputs (b). ``heal_steps``: when > 0, each
    slimmed model is also healed (:func:`moe_slim.dense.heal.heal`, ``heal_kwargs``) and (a)/(b) measured again.
    """
    from .heal import heal

    methods: dict[str, dict[str, Any]] = {}
    items: dict[str, dict[str, dict[str, list[float]]]] = {"before": {}, "after": {}}
    t0 = time.time()
    if own is not None and full_scores is None:
        full_scores = own.score(model)
        log(f"original: own-output accuracy {full_scores['accuracy']}" +
            (f", ppl {full_scores['ppl']}" if "ppl" in full_scores else "") + f" ({time.time() - t0:.0f}s)")
    for name, sel in selections.items():
        e = _entry(sel)
        t = time.time()
        if measurer is not None:
            e["probe"] = {k: v for k, v in measurer.measure(sel.keep).items() if k != "tasks"}
        if own is not None or heal_steps:
            slim = slim_model(copy.deepcopy(model), sel.keep)
            if own is not None:
                s = own.score(slim)
                e["own"] = retention(s, full_scores)
                items["before"][name] = s["items"]
                score_log(f"{name} ({e['reduction']:.2f}x)", e["own"], log)
            if heal_steps:
                e["heal"] = heal(slim, tokenizer, heal_steps, teacher=model, **(heal_kwargs or {}))
                if measurer is not None and probe_healed:
                    e["probe_healed"] = {k: v for k, v in measurer.measure_model(slim).items() if k != "tasks"}
                if own is not None:
                    s = own.score(slim)
                    e["own_healed"] = retention(s, full_scores)
                    items["after"][name] = s["items"]
                    score_log(f"{name} healed {heal_steps} steps", e["own_healed"], log)
            del slim
        e["seconds"] = round(time.time() - t, 1)
        methods[name] = e
        if on_method is not None:
            on_method(name, e)
    diffs: dict[str, Any] = {}
    scale = None
    if full_scores is not None:
        scale = float(sum(full_scores["accuracy"].values()) / len(full_scores["accuracy"]))
    for stage, got in items.items():
        if primary not in got:
            continue
        diffs[stage] = {m: paired_difference(got[primary], got[m], samples=bootstrap_samples, seed=seed, scale=scale)
                        for m in got if m != primary}
    return {"methods": methods, "full": {k: v for k, v in (full_scores or {}).items() if k != "items"},
            "differences": diffs, "primary": primary, "heal_steps": heal_steps,
            "difference_is": "retention of ProbScale minus the method's (own outputs, headline metric), 95% paired "
                             "bootstrap over items; 'tie' when the interval holds 0"}


def own_outputs_table(model: Any, tokenizer: Any, selections: dict[str, Selection], *, data_dir: Any,
                      model_eval: str = "auto", mc_limit: int = 40, heal_steps: int = 0, max_length: int = 128,
                      batch_size: int = 16, pooling: str = "mean", seed: int = 0,
                      log: Callable[[str], None] = lambda m: None) -> dict[str, Any] | None:
    """The ``probe`` run's own-output comparison (``own_outputs.json``); None when ``auto`` finds no test data."""
    from pathlib import Path

    from ..errors import MoeSlimError
    from .measure import PPL_DOMAINS, model_kind

    if model_eval not in ("auto", "on", "off"):
        raise MoeSlimError(f"model_eval {model_eval!r}: choose auto, on or off")
    kind = model_kind(model)
    own = None
    if model_eval != "off" and kind != "encoder-decoder":
        have = all((Path(data_dir) / d / "test.jsonl").is_file() for d in PPL_DOMAINS)
        if have or model_eval == "on":
            own = OwnOutputs(tokenizer, kind, data_dir, mc_limit=mc_limit, max_length=max_length,
                             batch_size=batch_size, pooling=pooling, seed=seed)
        else:
            log(f"own outputs not measured: {data_dir} has no test splits of {', '.join(PPL_DOMAINS)}")
    if own is None and not heal_steps:
        return None
    return compare_methods(model, tokenizer, selections, own=own, heal_steps=heal_steps,
                           heal_kwargs={"data_dir": data_dir, "seed": seed}, seed=seed, log=log)
