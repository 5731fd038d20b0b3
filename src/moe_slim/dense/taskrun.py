"""The user path: a labelled JSONL task in, a slimmed fine-tuned classifier checkpoint out.

``moe-slim slim-dense MODEL --task my_task.jsonl --budget x5 --out DIR``: hold out a stratified test
part of the task (or take ``--test FILE``), probe every layer on the rest, keep the layers ProbScale
selects (or another method's, at the same size), fine-tune the slimmed model and the full model on the
same texts with one recipe, score both on the held-out texts, and write the slimmed classifier (a
standard transformers ``*ForSequenceClassification`` checkpoint) with a card giving the retention and
its n and interval.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import MoeSlimError
from ..fingerprint import library_versions
from ..outputs import check_output
from .baselines import TASK_METHODS
from .classify import FinetuneConfig
from .family import layer_param_counts
from .slim import dequantized_note, gguf_source, load_dense, output_dtype, save_slimmed
from .taskcard import task_card
from .taskslim import finetune_and_score, plans_for_task, probe_summary, probe_task, retention_interval, split_task
from .tasks import balance, read_task_file


def slim_for_task(model_path: str | os.PathLike, task_path: str | os.PathLike, out: str | os.PathLike, *,
                  budget: str = "x5", test_path: str | os.PathLike | None = None, test_fraction: float = 0.2,
                  method: str = "probscale-contiguous", finetune: FinetuneConfig | None = None,
                  per_class: int | None = None, n_folds: int = 5, compare_full: bool = True, dtype: str = "auto",
                  overwrite: bool = False, log: Callable[[str], None] | None = None, probe_pooling: str = "mean"
                  ) -> dict[str, Any]:
    """Probe, select, fine-tune and write; returns what the card reports (``retention`` with ``n``)."""
    say = log or (lambda m: None)
    t_start = time.time()
    check_output(out, overwrite, inputs=[p for p in (model_path, task_path, test_path) if p is not None],
                 kind="checkpoint")
    if method not in TASK_METHODS:
        raise MoeSlimError(f"unknown method {method!r}; choose one of {', '.join(TASK_METHODS)}")
    cfg = finetune or FinetuneConfig()
    task = balance(read_task_file(task_path), per_class, cfg.seed)
    if test_path is not None:
        train, test = task, read_task_file(test_path, name=task.name)
        unknown = sorted(set(test.labels) - set(train.labels))
        if unknown:
            raise MoeSlimError(f"test label {unknown[0]!r} never occurs in the training task {task_path}")
    else:
        train, test = split_task(task, test_fraction, cfg.seed)
    train.validate(min_per_class=n_folds)
    overlap = len(set(train.texts) & set(test.texts))
    gguf = gguf_source(model_path)
    model, tok = load_dense(model_path)
    write_dtype = output_dtype(dtype, model, gguf)
    t0 = time.time()
    pm = probe_task(model, tok, train, max_length=cfg.max_length, n_folds=n_folds, seed=cfg.seed,
                    truncation=cfg.truncation, pooling=probe_pooling)
    plans = plans_for_task(model, pm, budget)
    sel = plans[method]
    probes = probe_summary(pm)
    say(f"probes: {len(train.texts)} texts, accuracy per layer {probes['accuracy']} ({time.time() - t0:.0f}s); "
        f"{method} keeps {sel.keep} ({sel.total / sel.params:.2f}x fewer layer parameters)")
    full = None
    if compare_full:
        full = finetune_and_score(model, tok, None, train, test, cfg, log=say)
        say(f"full model fine-tuned: accuracy {full['accuracy']:.3f} (n={full['n']}, {full['seconds']} s)")
    slim = finetune_and_score(model, tok, sel.keep, train, test, cfg, log=say, return_model=True)
    say(f"slimmed model fine-tuned: accuracy {slim['accuracy']:.3f} (n={slim['n']}, {slim['seconds']} s)")
    clf = slim.pop("model")
    ret = retention_interval(slim["hits"], full["hits"]) if full is not None else None
    lp = layer_param_counts(model)
    info = {
        "source": Path(str(model_path)).name, "task": Path(str(task_path)).name, "method": method, "budget": budget,
        "keep": sel.keep, "layers_before": {k: len(v) for k, v in lp.items()},
        "layer_params_before": sel.total, "layer_params_after": sel.params, "reduction": sel.total / sel.params,
        "params_before": sum(p.numel() for p in model.base_model.parameters()),
        "params_after": slim["params"], "embedding_params": sum(p.numel() for p in model.get_input_embeddings().parameters()),
        "train": train.counts(), "test": test.counts(), "test_source": "file" if test_path else f"{test_fraction:.0%} held out",
        "train_test_overlap": overlap, "probe_pooling": probe_pooling, "finetune": slim["finetune"], "accuracy": slim["accuracy"], "n": slim["n"],
        "full_accuracy": full["accuracy"] if full else None, "retention": ret, "probes": probes,
        "plans": {m: s.keep for m, s in plans.items()}, "dtype": str(write_dtype).removeprefix("torch."),
        "dequantized": dequantized_note(gguf, write_dtype) if gguf else None, "libraries": library_versions(),
    }
    info["seconds"] = round(time.time() - t_start, 1)
    clf.to(write_dtype)
    save_slimmed(clf, tok, out, overwrite=overwrite, provenance=info, card=task_card(info))
    return info
