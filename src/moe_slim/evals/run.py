"""Evaluate a model held in memory: named suites of translation, multiple-choice, math and perplexity.

    >>> results = evaluate(model, tokenizer, suite="quick")
    >>> results["metrics"]["translation/chrf"]

The model is never reloaded or written: pruned and merged variants are scored as they are. The
results are one JSON-ready dict that records what was measured and how (suite and its version,
the model's fingerprint, sha256 of every data file read, library versions, per-task timings), the
scores per task, a flat ``metrics`` summary (``"task/metric"`` -> number) for sweeps and reports,
and the saved translation hypotheses and math predictions.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..fingerprint import library_versions, model_fingerprint, weights_hash
from ..outputs import atomic_file
from .data import DataLedger, data_file, require_fields, split_for
from .mc import TaskResolver, run_mc
from .mc_items import MC_TASKS
from .suites import BUILTIN_TASKS, SUITES, Suite, expand_tasks, get_suite

RESULTS_FORMAT = 1
#: Models up to this many parameters also get a hash of their weight values in the results.
WEIGHTS_HASH_MAX_PARAMS = 300_000_000
_TASK_DOMAINS = {"translation": ("translation",), "math_gen": ("math",),
                 "perplexity": ("general", "math", "code", "translation"),
                 "translation_choice": ("translation",), "math_choice": ("math",), "code_next_line": ("code",),
                 "general_cloze": ("general",)}


@dataclass
class EvalPlan:
    """What a call to :func:`evaluate` will run, checked before any model work."""

    suite: Suite
    tasks: list[str]
    data_dir: Path
    external: list[str] = field(default_factory=list)
    resolver: TaskResolver | None = None
    testset: Any = None  # a resolved moe_slim.evals.testsets.TestSet replacing data/translation/test.jsonl
    testset_records: list[dict[str, Any]] = field(default_factory=list)
    split: str = "test"  # catalog_test / catalog_validation: translation tasks only (others read test)

    @property
    def mc_tasks(self) -> list[str]:
        return [t for t in self.tasks if t in MC_TASKS or t in self.external]


def check_testset_names(tasks: Sequence[str]) -> None:
    """A translation test set asked for as a task (``--tasks wmt22``) points to the option that runs it."""
    from sacrebleu.dataset import DATASETS

    from .testsets import FLORES_NAMES

    for t in tasks:
        if t.lower() in DATASETS or t.lower() in FLORES_NAMES:
            raise MoeSlimError(f"{t} is a translation test set, not a task: run it with --translation-testset "
                               f"{t.lower()}:en-de (en into de, fr or es)")


def check_hub_reachable(resolver: TaskResolver, tasks: Sequence[str]) -> None:
    """Registry tasks on a machine that cannot reach the hub and has no hub dataset cached cannot run: say so
    before indexing lm-eval's registry (~20 s)."""
    from ..modeling.hub import dataset_cached, hub_unavailable

    registry = resolver.outside_include_path(tasks)
    why = hub_unavailable() if registry else None
    if why and not dataset_cached():
        raise MoeSlimError(f"lm-eval task(s) {', '.join(registry)} read their datasets from the Hugging Face hub, "
                           f"which is {why}, and no hub dataset is cached here; run them once where the hub is "
                           "reachable to cache the data, or evaluate our offline tasks (--suite quick)")


def check_hub_datasets(resolver: TaskResolver, tasks: Sequence[str]) -> None:
    """lm-eval tasks whose datasets are neither cached nor reachable fail here in one line, before the model
    loads (the hub clients would otherwise retry for a minute, a line each time)."""
    from ..modeling.hub import dataset_cached, hub_unavailable

    why = hub_unavailable()
    if why is None:
        return
    missing = {t: d for t, d in resolver.hub_datasets(tasks).items() if not dataset_cached(d)}
    if missing:
        raise MoeSlimError(f"lm-eval task(s) {', '.join(missing)} need their datasets ({', '.join(missing.values())}) "
                           f"from the Hugging Face hub, which is {why}; run them once where the hub is reachable "
                           "to cache the data, or evaluate our offline tasks (--suite quick)")


def plan_evaluation(
    suite: str = "quick",
    *,
    tasks: Sequence[str] | str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    baseline: Any = None,
    translation_testset: str | None = None,
    split: str = "test",
) -> EvalPlan:
    """Check a request (suite, task names, data files, baseline) and say what will run; MoeSlimError if it cannot.

    ``translation_testset`` (``wmt22:en-de``, ``flores200:en-de``) translates a standard test set
    instead of the built data's translation test split. ``split``: the data split evaluated
    (``test``, ``validation``, ..., or ``catalog_test``, whose translation catalogs no other split has
    seen; domains without catalog-level splits then use ``test``).
    """
    split_for("translation", split)  # an unknown split is one line, before anything else
    base = get_suite(suite).with_limit(limit)
    names = expand_tasks(tasks.split(",") if isinstance(tasks, str) else tasks) if tasks is not None \
        else list(base.tasks)
    external = [t for t in names if t not in BUILTIN_TASKS]
    resolver = TaskResolver(include_path)
    if external:
        check_testset_names(external)
        check_hub_reachable(resolver, external)  # a fresh offline machine: one line before indexing the registry
        resolver.manager(external)  # unknown names fail here, before any model work
        check_hub_datasets(resolver, external)
    data = data_dir_or_default(data_dir)
    if not data.is_dir():
        raise MoeSlimError(f"data directory {data} does not exist (build it with `moe-slim data build --out {data}` "
                           "or point --data-dir at one)")
    testset, testset_records = None, []
    if translation_testset is not None:
        from .testsets import load_testset, resolve_testset

        if "translation" not in names:
            names.append("translation")
        testset = resolve_testset(translation_testset)
        testset_records = load_testset(testset)  # downloads (once) now: an unreachable set fails before model work
    for t in names:
        for domain in _TASK_DOMAINS.get(t, ()):
            if not (t == "translation" and testset is not None):
                data_file(data, domain, split_for(domain, split))
    if baseline is not None and "translation" not in names:
        raise MoeSlimError("a baseline compares translations, but this run has no translation task "
                           "(add translation to --tasks or drop --baseline)")
    if isinstance(baseline, (str, os.PathLike)) and not Path(baseline).is_file():
        raise MoeSlimError(f"baseline {baseline} does not exist (give a results JSON written by `moe-slim eval`)")
    return EvalPlan(base, names, data, external, resolver, testset, testset_records, split)


def _model_info(model: Any, hash_weights: bool | None) -> dict[str, Any]:
    n_params = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
        "class": type(model).__name__,
        "parameters": int(n_params),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "fingerprint": model_fingerprint(model),
    }
    if hash_weights or (hash_weights is None and n_params <= WEIGHTS_HASH_MAX_PARAMS):
        info["weights_hash"] = weights_hash(model)
    return info


def _clean_json(obj: Any) -> Any:
    """NaN and infinities become None so the results are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def summary_metrics(tasks: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of each task as a flat ``{"task/metric": value}`` dict."""
    out: dict[str, float] = {}
    tr = tasks.get("translation")
    if tr:
        for metric in ("bleu", "chrf", "chrf++"):
            out[f"translation/{metric}"] = tr["overall"][metric]
        for pair, entry in tr["pairs"].items():
            for metric in ("bleu", "chrf", "chrf++", "copy_chrf"):
                if metric in entry:
                    out[f"translation/{pair}/{metric}"] = entry[metric]
        out["translation/n"] = float(tr["overall"]["n"])
        if "copy_chrf" in tr["overall"]:
            out["translation/copy_chrf"] = tr["overall"]["copy_chrf"]
        if "vs_copy" in tr:  # paired bootstrap against copying the source, on the same sentences
            c = tr["vs_copy"]
            out["translation/chrf_lo"], out["translation/chrf_hi"] = c["system_ci95"]
            out["translation/chrf_delta_vs_copy"] = c["delta"]
            out["translation/chrf_delta_vs_copy_lo"], out["translation/chrf_delta_vs_copy_hi"] = c["delta_ci95"]
        if "baseline" in tr:  # paired bootstrap against another system's hypotheses on the same sentences
            c = tr["baseline"]["overall"]["chrf"]
            out["translation/chrf_delta_vs_baseline"] = c["delta"]
            out["translation/chrf_delta_lo"], out["translation/chrf_delta_hi"] = c["delta_ci95"]
            out["translation/chrf_lo"], out["translation/chrf_hi"] = c["system_ci95"]
            out["translation/chrf_delta_p"] = c["p_value"]
    for name, entry in tasks.items():
        if name in ("translation", "math_gen", "perplexity") or not isinstance(entry, Mapping):
            continue
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_stderr"):
                out[f"{name}/{key}"] = float(value)
    if "math_gen" in tasks:
        out["math_gen/exact_match"] = tasks["math_gen"]["exact_match"]
        if "n" in tasks["math_gen"]:
            out["math_gen/n"] = float(tasks["math_gen"]["n"])
    ppl = tasks.get("perplexity")
    if ppl and "overall" in ppl:
        out["perplexity/ppl"] = ppl["overall"]["ppl"]
        out["perplexity/tokens"] = float(ppl["overall"].get("tokens", 0))
        for domain, entry in ppl["domains"].items():
            out[f"perplexity/{domain}/ppl"] = entry["ppl"]
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    suite: str = "quick",
    *,
    data_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | str | None = None,
    limit: int | None = None,
    baseline: str | os.PathLike | Sequence[str] | Mapping[str, Any] | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch_size: int | None = None,
    mc_batch_size: int | None = None,
    seq_len: int | None = None,
    mc_cache_dir: str | os.PathLike | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 12345,
    hash_weights: bool | None = None,
    log: Callable[[str], None] | None = None,
    translation_testset: str | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Run a suite (or the named ``tasks``, with the suite's limits) on the in-memory ``model``.

    ``suite``: one of :data:`~moe_slim.evals.suites.SUITES` (``quick``, ``full``, ``translation``,
    ``mc``). ``tasks``: names from ``translation``, ``translation_choice``, ``math_choice``,
    ``code_next_line``, ``general_cloze``, ``math_gen``, ``perplexity`` (aliases ``mc``, ``all``),
    or lm-eval task names found under ``include_path``. ``limit`` caps items per task (per language
    pair for translation, per domain for perplexity). ``baseline``: translation hypotheses of another
    system (a results JSON path or dict, an id->hypothesis mapping, or a list in order) for a seeded
    paired bootstrap. ``batch_size`` is for generation and perplexity, ``mc_batch_size`` for lm-eval.
    Unknown suites or tasks, missing data and bad baselines raise MoeSlimError before any model work.
    """
    plan = plan_evaluation(suite, tasks=tasks, data_dir=data_dir, limit=limit, include_path=include_path,
                           baseline=baseline, translation_testset=translation_testset, split=split)
    return run_plan(model, tokenizer, plan, baseline=baseline, batch_size=batch_size, mc_batch_size=mc_batch_size,
                    seq_len=seq_len, mc_cache_dir=mc_cache_dir, bootstrap_samples=bootstrap_samples, seed=seed,
                    hash_weights=hash_weights, log=log, limit=limit)


def run_plan(
    model: Any,
    tokenizer: Any,
    plan: EvalPlan,
    *,
    baseline: Any = None,
    batch_size: int | None = None,
    mc_batch_size: int | None = None,
    seq_len: int | None = None,
    mc_cache_dir: str | os.PathLike | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 12345,
    hash_weights: bool | None = None,
    log: Callable[[str], None] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run a checked :class:`EvalPlan` (see :func:`evaluate`)."""
    from .math_gen import evaluate_math
    from .perplexity import evaluate_perplexity
    from .translation import TRANSLATION_FIELDS, evaluate_translation, select_records

    say = log or (lambda msg: None)
    suite = plan.suite
    gen_batch = batch_size or 32
    ledger = DataLedger(plan.data_dir)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        if "translation" in plan.tasks:
            t0 = time.perf_counter()
            if plan.testset is not None:
                records = select_records(plan.testset_records, suite.translation_per_pair)
            else:
                records = ledger.load("translation", plan.split)
                require_fields(records, TRANSLATION_FIELDS, plan.data_dir / "translation" / f"{plan.split}.jsonl")
                records = select_records(records, suite.translation_per_pair)
            say(f"translation: {len(records)} sentences" + (f" of {plan.testset.label}" if plan.testset else ""))
            results["translation"] = evaluate_translation(
                model, tokenizer, records, batch_size=gen_batch, baseline=baseline,
                bootstrap_samples=bootstrap_samples, seed=seed)
            timings["translation"] = time.perf_counter() - t0
        if plan.mc_tasks:
            t0 = time.perf_counter()
            say(f"multiple choice (lm-eval): {', '.join(plan.mc_tasks)}")
            mc = run_mc(model, tokenizer, plan.mc_tasks, data_dir=plan.data_dir, cache_dir=mc_cache_dir,
                        limit=suite.mc_limit, batch_size=mc_batch_size or 16, resolver=plan.resolver,
                        split=plan.split)
            for name in plan.mc_tasks:
                if name in mc["tasks"]:
                    results[name] = {**mc["tasks"][name], "timing": "mc"}
            for name, info in mc["tasks"].items():  # groups expand to subtasks
                results.setdefault(name, {**info, "timing": "mc"})
            for info in mc["data"].values():  # derived items live in the cache: named as mc/<file>, not by path
                ledger.record(info["path"], key=f"mc/{Path(info['path']).name}")
            results["_mc"] = {"data": mc["data"], "lm_eval": mc.get("lm_eval", {})}
            timings["mc"] = time.perf_counter() - t0
        if "math_gen" in plan.tasks:
            t0 = time.perf_counter()
            path = plan.data_dir / "math" / f"{split_for('math', plan.split)}.jsonl"
            records = ledger.load("math", split_for("math", plan.split))
            require_fields(records, ("id", "answer"), path)
            records = records[: suite.math_limit] if suite.math_limit is not None else records
            say(f"math_gen: {len(records)} problems")
            results["math_gen"] = evaluate_math(model, tokenizer, records, batch_size=min(gen_batch, 16),
                                                max_new_tokens=suite.math_max_new_tokens)
            timings["math_gen"] = time.perf_counter() - t0
        if "perplexity" in plan.tasks:
            t0 = time.perf_counter()
            docs = {}
            for domain in _TASK_DOMAINS["perplexity"]:
                records = ledger.load(domain, split_for(domain, plan.split))
                require_fields(records, ("text",), plan.data_dir / domain / f"{split_for(domain, plan.split)}.jsonl")
                docs[domain] = [str(r["text"]) for r in (records[: suite.ppl_docs] if suite.ppl_docs else records)]
            say(f"perplexity: {sum(len(d) for d in docs.values())} documents")
            results["perplexity"] = evaluate_perplexity(model, tokenizer, docs, seq_len=seq_len or suite.ppl_seq_len,
                                                        batch_size=max(1, gen_batch // 4))
            timings["perplexity"] = time.perf_counter() - t0
    finally:
        if was_training:
            model.train()
    timings["total"] = time.perf_counter() - started
    mc_meta = results.pop("_mc", None)
    suite_info = asdict(suite)
    suite_info["tasks"] = list(suite.tasks)
    out: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "kind": "moe_slim.eval",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "suite": suite.name,
        "suite_version": suite.version_tag,
        "suite_settings": suite_info,
        "tasks_run": list(plan.tasks),
        "split": plan.split,
        "limit": limit,
        "model": _model_info(model, hash_weights),
        "data": {"dir": str(plan.data_dir), "files": dict(sorted(ledger.files.items()))},
        "libraries": library_versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "metrics": summary_metrics(results),
        "tasks": results,
    }
    if mc_meta is not None:
        out["data"]["mc"] = {k: {kk: vv for kk, vv in v.items() if kk != "rebuilt"} for k, v in mc_meta["data"].items()}
        out["lm_eval"] = mc_meta["lm_eval"]
    return _clean_json(out)


def write_results(results: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write results JSON atomically; an existing file is refused unless ``overwrite``."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(_clean_json(results), indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                       encoding="utf-8")
    return Path(path)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results JSON written by :func:`write_results`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MoeSlimError(f"results file {p} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeSlimError(f"{p} is not a results JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") != "moe_slim.eval":
        raise MoeSlimError(f"{p} is not a results file written by `moe-slim eval`")
    return data


__all__ = ["SUITES", "EvalPlan", "evaluate", "load_results", "plan_evaluation", "run_plan", "summary_metrics",
           "write_results"]
