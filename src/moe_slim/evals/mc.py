"""Multiple-choice tasks through lm-evaluation-harness, on the in-memory model.

Our four tasks are derived deterministically from the test split (see :data:`BUILDERS`) and written
as JSONL into a cache directory (``~/.cache/moe_slim/mc/<source sha256>/`` by default), rebuilt only when the source file's
sha256 or the builder version changes. Their lm-eval definitions are the YAML files in the
repository's top-level ``evals/`` directory; at run time each YAML is loaded and pointed at the
cached JSONL. All tasks (ours and any lm-eval task the user names, found in ``include_path`` or
among lm-eval's own) run in one ``lm_eval.simple_evaluate`` call through one ``HFLM`` wrapper around
the model object: nothing is reloaded or copied.

Every item has ``query`` (the context), ``choices`` (four continuations, each carrying its own
leading space or none) and ``gold`` (index of the right one); items are shuffled with a fixed seed
so that any prefix (``limit``) is a fair sample of the whole set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..modeling.hub import offline as hub_offline
from ..outputs import cache_dir as default_cache_dir
from .data import file_sha256, read_jsonl
from .mc_items import BUILDER_VERSION, BUILDERS, MC_SEED, MC_TASKS

TASK_PREFIX = "moe_slim_"
ENV_EVALS_DIR = "MOE_SLIM_EVALS_DIR"


# ------------------------------------------------------------------------------------------ cache
def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_mc_data(task: str, data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    split: str = "test") -> dict[str, Any]:
    """The JSONL of one of our MC tasks, built from ``<data_dir>/<domain>/<split>.jsonl`` or reused from the cache.

    Returns ``{"path", "sha256", "n", "source", "source_sha256", "rebuilt"}``. The items are cached under
    ``cache_dir`` (default: ``mc/<source sha256>/`` in :func:`moe_slim.outputs.cache_dir`, never inside
    the data directory, an input); when it cannot be written a temporary directory is used.
    """
    if task not in BUILDERS:
        raise MoeSlimError(f"unknown multiple-choice task {task!r} (ours: {', '.join(MC_TASKS)})")
    from .data import data_file

    domain, builder = BUILDERS[task]
    source = data_file(data_dir, domain, split)
    source_sha = file_sha256(source)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "mc" / source_sha[:16]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache, prefix=".probe-")
        probe.close()
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="moe_slim_mc-"))
    suffix = "" if split == "test" else f"_{split}"
    path = cache / f"{task}{suffix}.jsonl"
    meta_path = cache / f"{task}{suffix}.meta.json"
    key = {"task": task, "builder_version": BUILDER_VERSION, "seed": MC_SEED, "source_sha256": source_sha}
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if all(meta.get(k) == v for k, v in key.items()) and meta.get("sha256") == file_sha256(path):
            return {"path": str(path), "sha256": meta["sha256"], "n": meta["n"],
                    "source": str(source), "source_sha256": source_sha, "rebuilt": False}
    items = builder(read_jsonl(source))
    if not items:
        raise MoeSlimError(f"{source} yields no {task} items (too few usable records); rebuild the data")
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    _write_atomic(path, text)
    sha = file_sha256(path)
    _write_atomic(meta_path, json.dumps({**key, "source": str(source), "sha256": sha, "n": len(items)}, indent=1))
    return {"path": str(path), "sha256": sha, "n": len(items), "source": str(source), "source_sha256": source_sha,
            "rebuilt": True}


# ------------------------------------------------------------------------------------- lm-eval
def evals_dir() -> Path:
    """The directory with our lm-eval task YAMLs (``$MOE_SLIM_EVALS_DIR`` or the repository's ``evals/``)."""
    env = os.environ.get(ENV_EVALS_DIR)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "evals")
    for c in candidates:
        if (c / f"{TASK_PREFIX}{MC_TASKS[0]}.yaml").is_file():
            return c
    raise MoeSlimError(f"the lm-eval task definitions (evals/{TASK_PREFIX}*.yaml) were not found; "
                       f"run from a moe_slim checkout or set {ENV_EVALS_DIR}")


def task_config(task: str, data_path: str | os.PathLike) -> dict[str, Any]:
    """Our task's lm-eval config (from its YAML), reading ``data_path``."""
    path = evals_dir() / f"{TASK_PREFIX}{task}.yaml"
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 (safe loader + one tag)
    cfg.pop("custom_dataset", None)  # the YAML's own loader (for lm-eval's CLI); here the items are built already
    cfg["dataset_path"] = "json"
    cfg["dataset_kwargs"] = {"data_files": {cfg.get("test_split", "test"): str(data_path)}}
    return cfg


class _TaskYamlLoader(yaml.SafeLoader):
    """A safe YAML loader that reads lm-eval's ``!function module.name`` tags as plain strings."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval without its log chatter and without the environment report it adds to every result:
    ``git describe`` in the working directory (which prints ``fatal: not a git repository`` outside a
    repository) and torch's ``collect_env`` (subprocesses, seconds per call). Our results record the
    library versions themselves."""
    import lm_eval.evaluator as evaluator

    names = ("lm_eval", "lm-eval", "datasets", "accelerate")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    patched = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    saved = {name: getattr(evaluator, name, None) for name in patched}
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    for name, fn in patched.items():
        if saved[name] is not None:
            setattr(evaluator, name, fn)
    # lm-eval passes disable=False to some of its bars, over TQDM_DISABLE: under --quiet, stderr goes nowhere
    hush = open(os.devnull, "w") if os.environ.get("TQDM_DISABLE") == "1" else None  # noqa: SIM115
    try:
        with contextlib.redirect_stderr(hush) if hush else contextlib.nullcontext():
            yield
    finally:
        if hush:
            hush.close()
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        for name, fn in saved.items():
            if fn is not None:
                setattr(evaluator, name, fn)


class TaskResolver:
    """Finds lm-eval tasks by name: in ``include_path`` first, then (only if needed, it is slow) lm-eval's own."""

    def __init__(self, include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> None:
        if include_path is None:
            self.include_path: list[str] = []
        elif isinstance(include_path, (str, os.PathLike)):
            self.include_path = [str(include_path)]
        else:
            self.include_path = [str(p) for p in include_path]
        for p in self.include_path:
            if not Path(p).exists():
                raise MoeSlimError(f"include path {p} does not exist (give a directory of lm-eval task YAMLs)")
        self._manager: Any = None
        self._with_defaults = False

    def manager(self, names: Sequence[str] = ()) -> Any:
        """A TaskManager that knows every name in ``names`` (MoeSlimError naming the first it does not).

        Names are looked up in ``include_path`` first; lm-eval's own registry (arc_easy, hellaswag,
        mmlu, ...) is indexed (slow: ~20 s) only when a name is not found there.
        """
        with _quiet_lm_eval():
            from lm_eval.tasks import TaskManager

            if self._manager is None:
                self._manager = TaskManager(include_path=self.include_path or None, include_defaults=False)
            missing = [n for n in names if n not in self._manager.all_tasks]
            if missing and not self._with_defaults:
                self._manager = TaskManager(include_path=self.include_path or None, include_defaults=True)
                self._with_defaults = True
                missing = [n for n in names if n not in self._manager.all_tasks]
        if missing:
            raise MoeSlimError(
                f"unknown task {missing[0]!r}: not one of ours ({', '.join(MC_TASKS)}) nor an lm-eval task "
                + (f"in {', '.join(self.include_path)} or " if self.include_path else "") + "in lm-eval's registry"
            )
        return self._manager


    def outside_include_path(self, names: Sequence[str]) -> list[str]:
        """The names the include path does not define (lm-eval's registry, slow to index, would be asked)."""
        if not names:
            return []
        with _quiet_lm_eval():
            from lm_eval.tasks import TaskManager

            if self._manager is None:
                self._manager = TaskManager(include_path=self.include_path or None, include_defaults=False)
            return [n for n in names if n not in self._manager.all_tasks]

    def hub_datasets(self, names: Sequence[str]) -> dict[str, str]:
        """The Hugging Face hub dataset each of ``names`` reads, for tasks whose YAML (with its includes)
        names one; groups, local files and ``datasets``' packaged builders (json, csv, ...) are left out."""
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
        from lm_eval.tasks._yaml_loader import load_yaml

        index = self.manager(names).task_index
        out: dict[str, str] = {}
        for name in names:
            entry = index.get(name)
            if entry is None or entry.yaml_path is None:
                continue
            try:
                path = load_yaml(entry.yaml_path, resolve_func=False).get("dataset_path")
            except Exception:  # a YAML lm-eval itself will complain about in its own words
                continue
            if isinstance(path, str) and path not in _PACKAGED_DATASETS_MODULES and not Path(path).exists():
                out[name] = path
        return out


def _clean_metrics(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("alias", "name", "sample_len") or isinstance(value, str) and value == "N/A":
            continue
        name = key[: -len(",none")] if key.endswith(",none") else key.replace(",", "/")
        out[name] = float(value) if isinstance(value, (int, float)) else value
    return out


def run_mc(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    resolver: TaskResolver | None = None,
    split: str = "test",
    per_item: bool = False,
) -> dict[str, Any]:
    """Run MC tasks (ours by short name, others by lm-eval name) in one lm-eval call on the in-memory model.

    Returns ``{"tasks": {name: {"acc", "acc_norm", "acc_stderr", ..., "n"}}, "data": {name: info},
    "lm_eval": {...}}``; with ``per_item``, also ``"items": {name: [acc of doc 0, doc 1, ...]}`` (for
    paired bootstraps between models scored on the same items).
    """
    if not tasks:
        return {"tasks": {}, "data": {}}
    resolver = resolver or TaskResolver(include_path)
    ours = [t for t in tasks if t in BUILDERS]
    others = [t for t in tasks if t not in BUILDERS]
    manager = resolver.manager(others)
    data_dir = data_dir_or_default(data_dir)
    from .data import split_for

    data_info = {t: prepare_mc_data(t, data_dir, cache_dir, split=split_for(BUILDERS[t][0], split)) for t in ours}
    specs: list[Any] = [task_config(t, data_info[t]["path"]) for t in ours] + list(others)
    names = {f"{TASK_PREFIX}{t}": t for t in ours}

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tok = tokenizer
    if getattr(tok, "pad_token", None) is None:  # lm-eval would set one on the caller's tokenizer
        tok = copy.deepcopy(tokenizer)
    if max_length is None:
        max_length = min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 4096)
    was_training = bool(getattr(model, "training", False))
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)
        try:
            # MC scoring draws no random numbers; leaving the seeds alone keeps the caller's RNG state.
            out = simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=None,
                                  bootstrap_iters=1000, log_samples=per_item, cache_requests=False,
                                  confirm_run_unsafe_code=False, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None, fewshot_random_seed=MC_SEED)
        except Exception as exc:  # dataset problems surface here with lm-eval's many exception types
            if isinstance(exc, MoeSlimError):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            if others and hub_offline():
                raise MoeSlimError(f"lm-eval task(s) {', '.join(others)} need their datasets from the Hugging Face "
                                   "hub, which is offline here (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE); run online once "
                                   f"to cache them ({type(exc).__name__}: {first})") from exc
            raise MoeSlimError(f"lm-eval failed: {type(exc).__name__}: {first}") from exc
    if was_training:
        model.train()
    results: dict[str, Any] = {}
    n_samples = out.get("n-samples", {})
    for lm_name, raw in out["results"].items():
        name = names.get(lm_name, lm_name)
        entry = _clean_metrics(raw)
        ns = n_samples.get(lm_name, {})
        if ns:
            entry["n"] = int(ns.get("effective", ns.get("original", 0)))
        if name in data_info:
            entry["lm_eval_task"] = lm_name
        results[name] = entry
    extra: dict[str, Any] = {}
    if per_item:
        extra["items"] = {names.get(k, k): [float(x.get("acc", 0.0)) for x in sorted(v, key=lambda x: x["doc_id"])]
                          for k, v in (out.get("samples") or {}).items()}
    return {"tasks": results, "data": data_info, **extra,
            "lm_eval": {"version": out.get("config", {}).get("lm_eval_version") or _lm_eval_version(),
                        "batch_size": batch_size, "max_length": max_length, "num_fewshot": 0,
                        "versions": {names.get(k, k): v for k, v in out.get("versions", {}).items()}}}


def _lm_eval_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "unknown"
