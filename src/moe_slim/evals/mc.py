"""Multiple-choice tasks through lm-evaluation-harness, on the in-memory model.

Our four tasks are derived deterministically from the test split (see :data:`BUILDERS`) and written
as JSONL into a cache directory (``<data_dir>/mc/`` by default), rebuilt only when the source file's
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
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from ..errors import MoeSlimError
from ..prompts import translation_prompt, translation_target
from .data import file_sha256, read_jsonl

BUILDER_VERSION = 2
MC_SEED = 1234
N_CHOICES = 4
TASK_PREFIX = "moe_slim_"
ENV_EVALS_DIR = "MOE_SLIM_EVALS_DIR"

Item = dict[str, Any]


# --------------------------------------------------------------------------------------- builders
def _rng(task: str, key: str) -> random.Random:
    return random.Random(f"{MC_SEED}|{task}|{key}")


def _item(task: str, rec_id: str, query: str, gold: str, distractors: Sequence[str]) -> Item:
    """Four choices with the gold one at a seeded position."""
    choices = list(distractors[: N_CHOICES - 1])
    pos = _rng(task, f"{rec_id}|pos").randrange(N_CHOICES)
    choices.insert(pos, gold)
    return {"id": f"{task}-{rec_id}", "source_id": rec_id, "query": query, "choices": choices, "gold": pos}


def _pick_distinct(rng: random.Random, pool: Sequence[str], gold: str, k: int,
                   key: Callable[[str], str] = lambda s: s) -> list[str]:
    """``k`` distinct entries of ``pool`` that differ from ``gold`` (under ``key``), or fewer if the pool is short."""
    seen = {key(gold)}
    out: list[str] = []
    if not pool:
        return out
    tries = 0
    while len(out) < k and tries < 8 * k + 16:
        cand = pool[rng.randrange(len(pool))]
        tries += 1
        if key(cand) not in seen:
            seen.add(key(cand))
            out.append(cand)
    if len(out) < k:  # small pools: a full scan in seeded order
        rest = [c for c in pool if key(c) not in seen]
        rng.shuffle(rest)
        for cand in rest:
            if key(cand) not in seen:
                seen.add(key(cand))
                out.append(cand)
            if len(out) == k:
                break
    return out


def _shuffled(task: str, items: list[Item]) -> list[Item]:
    _rng(task, "order").shuffle(items)
    return items


def build_translation_choice(records: Sequence[Mapping[str, Any]]) -> list[Item]:
    """Prompt ``<|en|>{src}<|xx|>``; the right ``{ref}<|end|>`` among 4, distractors = other refs of the same language."""
    task = "translation_choice"
    by_lang: dict[str, list[str]] = {}
    for rec in records:
        by_lang.setdefault(str(rec["tgt_lang"]), []).append(str(rec["ref"]))
    pools = {lang: sorted(set(refs)) for lang, refs in by_lang.items()}
    items = []
    for rec in records:
        rid, ref = str(rec["id"]), str(rec["ref"])
        distractors = _pick_distinct(_rng(task, rid), pools[str(rec["tgt_lang"])], ref, N_CHOICES - 1)
        if len(distractors) < N_CHOICES - 1:
            continue
        query = str(rec.get("prompt") or translation_prompt(rec["src"], rec["tgt_lang"], rec.get("src_lang", "en")))
        items.append(_item(task, rid, query, translation_target(ref),
                           [translation_target(d) for d in distractors]))
    return _shuffled(task, items)


_NUMBER = re.compile(r"^-?\d[\d,]*(\.\d+)?$|^-?\.\d+$")


def _perturb_number(answer: str, rng: random.Random) -> list[str]:
    """Plausible wrong answers near a numeric one, formatted like it."""
    text = answer.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = Fraction(text)
    steps = [1, -1, 2, -2, 10, -10, 3, -3]
    cands = [value + s for s in steps] + [value * 2, value / 2 if decimals or value.denominator == 1 and value % 2 == 0
                                          else value * 3]
    if decimals:
        unit = Fraction(1, 10 ** decimals)
        cands += [value + unit, value - unit]
    out = []
    for c in cands:
        if c == value:
            continue
        s = f"{float(c):.{decimals}f}" if decimals else (str(c.numerator) if c.denominator == 1 else None)
        if s is not None and s not in out:
            out.append(s)
    rng.shuffle(out)
    return out


def build_math_choice(records: Sequence[Mapping[str, Any]]) -> list[Item]:
    """The math prompt; the right final answer among 4 (numeric answers perturbed, others drawn from other problems)."""
    task = "math_choice"
    pool = sorted({str(r["answer"]).strip() for r in records if str(r.get("answer", "")).strip()})
    # a non-numeric answer gets non-numeric distractors, so the form of an answer does not give it away
    worded = [a for a in pool if not _NUMBER.match(a)]
    items = []
    for rec in records:
        rid, answer = str(rec["id"]), str(rec.get("answer", "")).strip()
        if not answer:
            continue
        rng = _rng(task, rid)
        cands = _perturb_number(answer, rng) if _NUMBER.match(answer) else []
        distractors = _pick_distinct(rng, cands, answer, N_CHOICES - 1)
        if len(distractors) < N_CHOICES - 1:
            others = worded if not _NUMBER.match(answer) and len(worded) > N_CHOICES else pool
            distractors += _pick_distinct(rng, others, answer, N_CHOICES - 1 - len(distractors))
            distractors = list(dict.fromkeys(distractors))
        if len(distractors) < N_CHOICES - 1:
            continue
        query = str(rec.get("prompt") or f"Question: {rec['question']}\nAnswer:")
        sep = "" if query[-1:].isspace() else " "
        items.append(_item(task, rid, query, sep + answer, [sep + d for d in distractors]))
    return _shuffled(task, items)


def build_code_next_line(records: Sequence[Mapping[str, Any]], context_lines: int = 8) -> list[Item]:
    """A few lines of code; the true next line among 4 (other lines of the same file first, then other files)."""
    task = "code_next_line"

    def usable(line: str) -> bool:
        return len(line.strip()) >= 3

    global_pool = sorted({ln for r in records for ln in str(r["text"]).split("\n") if usable(ln)})
    items = []
    for rec in records:
        rid = str(rec["id"])
        lines = str(rec["text"]).split("\n")
        candidates = [i for i in range(len(lines)) if usable(lines[i]) and sum(usable(x) for x in lines[:i]) >= 2]
        if not candidates:
            continue
        rng = _rng(task, rid)
        i = candidates[rng.randrange(len(candidates))]
        gold = lines[i]
        start = max(0, i - context_lines)
        shown = {ln.strip() for ln in lines[start:i]}  # lines already in the context make poor distractors
        local = sorted({ln for j, ln in enumerate(lines) if j != i and usable(ln) and ln.strip() not in shown})
        distractors = _pick_distinct(rng, local, gold, N_CHOICES - 1, key=str.strip)
        if len(distractors) < N_CHOICES - 1:
            extra = _pick_distinct(rng, global_pool, gold, N_CHOICES - 1, key=str.strip)
            have = {d.strip() for d in distractors} | shown
            distractors += [d for d in extra if d.strip() not in have][: N_CHOICES - 1 - len(distractors)]
        if len(distractors) < N_CHOICES - 1:
            continue
        query = "\n".join(lines[start:i]) + "\n"
        items.append(_item(task, rid, query, gold, distractors))
    return _shuffled(task, items)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^(.*\S)\s+([A-Za-zÀ-ÿ][A-Za-zÀ-ÿ'-]{2,})([.!?,;:\"')]*)$", re.S)


def _cloze_point(text: str, rng: random.Random, max_context_chars: int) -> tuple[str, str] | None:
    """(context, last word) for a seeded sentence of ``text`` that ends in a word of 3+ letters."""
    sentences = _SENTENCE_END.split(text.strip())
    options = []
    offset = 0
    starts = []
    for s in sentences:
        pos = text.find(s, offset)
        starts.append(pos)
        offset = pos + len(s)
    for k, s in enumerate(sentences[:12]):
        m = _WORD.match(s)
        if m and len(s.split()) >= 5:
            options.append((k, m))
    if not options:
        return None
    k, m = options[rng.randrange(len(options))]
    context = text[: starts[k]] + m.group(1)
    if len(context) > max_context_chars:  # keep the end, from a word boundary
        cut = context[-max_context_chars:]
        context = cut[cut.find(" ") + 1:] if " " in cut else cut
    return context, m.group(2)


def build_general_cloze(records: Sequence[Mapping[str, Any]], max_context_chars: int = 600) -> list[Item]:
    """Text up to a sentence's last word; the right word among 4 (distractors: other items' words)."""
    task = "general_cloze"
    points: list[tuple[str, str, str]] = []
    for rec in records:
        rid = str(rec["id"])
        p = _cloze_point(str(rec["text"]), _rng(task, rid), max_context_chars)
        if p is not None:
            points.append((rid, *p))
    pool = sorted({w for _, _, w in points})
    items = []
    for rid, context, word in points:
        distractors = _pick_distinct(_rng(task, rid + "|d"), pool, word, N_CHOICES - 1, key=str.lower)
        if len(distractors) < N_CHOICES - 1:
            continue
        items.append(_item(task, rid, context, " " + word, [" " + d for d in distractors]))
    return _shuffled(task, items)


#: task -> (source domain, builder). Task names in lm-eval carry the ``moe_slim_`` prefix.
BUILDERS: dict[str, tuple[str, Callable[[Sequence[Mapping[str, Any]]], list[Item]]]] = {
    "translation_choice": ("translation", build_translation_choice),
    "math_choice": ("math", build_math_choice),
    "code_next_line": ("code", build_code_next_line),
    "general_cloze": ("general", build_general_cloze),
}
MC_TASKS: tuple[str, ...] = tuple(BUILDERS)


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

    Returns ``{"path", "sha256", "n", "source", "source_sha256", "rebuilt"}``. The cache directory
    defaults to ``<data_dir>/mc``; when it cannot be written a temporary directory is used.
    """
    if task not in BUILDERS:
        raise MoeSlimError(f"unknown multiple-choice task {task!r} (ours: {', '.join(MC_TASKS)})")
    from .data import data_file

    domain, builder = BUILDERS[task]
    source = data_file(data_dir, domain, split)
    source_sha = file_sha256(source)
    cache = Path(cache_dir) if cache_dir is not None else Path(data_dir) / "mc"
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
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("dataset_kwargs", {})["data_files"] = {cfg.get("test_split", "test"): str(data_path)}
    return cfg


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    names = ("lm_eval", "lm-eval", "datasets", "accelerate")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


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

        Names are looked up in ``include_path``; lm-eval's own tasks are indexed (slow: ~20 s) only
        when an include path is given and a name is not in it.
        """
        missing = list(names)
        if missing and not self.include_path:
            raise MoeSlimError(
                f"unknown task {missing[0]!r}: ours are {', '.join(MC_TASKS)} (and translation, math_gen, "
                "perplexity, mc); for an lm-eval task pass --include-path DIR with its YAML"
            )
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
                f"in {', '.join(self.include_path)} or lm-eval's own"
            )
        return self._manager


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
    data_dir: str | os.PathLike = "data",
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    resolver: TaskResolver | None = None,
) -> dict[str, Any]:
    """Run MC tasks (ours by short name, others by lm-eval name) in one lm-eval call on the in-memory model.

    Returns ``{"tasks": {name: {"acc", "acc_norm", "acc_stderr", ..., "n"}}, "data": {name: info},
    "lm_eval": {...}}``.
    """
    if not tasks:
        return {"tasks": {}, "data": {}}
    resolver = resolver or TaskResolver(include_path)
    ours = [t for t in tasks if t in BUILDERS]
    others = [t for t in tasks if t not in BUILDERS]
    manager = resolver.manager(others)
    data_info = {t: prepare_mc_data(t, data_dir, cache_dir) for t in ours}
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
                                  bootstrap_iters=1000, log_samples=False, cache_requests=False,
                                  confirm_run_unsafe_code=False, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None, fewshot_random_seed=MC_SEED)
        except Exception as exc:  # dataset problems surface here with lm-eval's many exception types
            if isinstance(exc, MoeSlimError):
                raise
            raise MoeSlimError(f"lm-eval failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
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
    return {"tasks": results, "data": data_info,
            "lm_eval": {"version": out.get("config", {}).get("lm_eval_version") or _lm_eval_version(),
                        "batch_size": batch_size, "max_length": max_length, "num_fewshot": 0,
                        "versions": {names.get(k, k): v for k, v in out.get("versions", {}).items()}}}


def _lm_eval_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "unknown"
