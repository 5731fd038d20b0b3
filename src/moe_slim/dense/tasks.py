"""Probe tasks: labelled texts, from JSONL files or built from the project's data directory.

A task file is JSONL with one object per line: ``{"text": ..., "label": ...}`` (``target`` is
accepted in place of ``label``). Labels are class names (strings, integers or booleans).

Built-in tasks, built offline from ``data/<domain>/<split>.jsonl`` with a seed:

* ``langid``: language identification (en/de/fr/es) from the translation pairs: the English
  ``src`` is labelled ``en``, the ``ref`` is labelled with its ``tgt_lang``;
* ``domainid``: domain identification (general/math/code) from the ``text`` of those domains;
* ``codeprose``: code (the ``code`` domain's ``text``) versus prose (the ``general`` domain's);
* ``genre``: which source a ``general`` text comes from (its ``origin`` before the colon: fortunes,
  the Python documentation, plays);
* ``catalogid``: which program's message catalog an English message comes from (the ``.mo`` file
  named in the translation pair's ``origin``; the four catalogs with the most distinct messages in
  every split, so the classes are the same for train and test);
* ``pairmatch``: does a translation pair match? ``src`` and ``ref`` formatted with the shared
  translation prompt (:func:`moe_slim.prompts.translation_text`), either the true pair or the
  ``ref`` of another pair *of the same target language* (so the language gives nothing away).
  This needs the model to relate the two halves, which is what makes it harder.

Harder tasks, where the late layers matter (each a binary right/wrong classification, balanced):

* ``pairmatch-hard``: like ``pairmatch``, but the wrong ``ref`` is a *hard negative*: of the same
  target language, the one sharing most words with the true ``ref``, then the closest in length;
* ``codeline``: a few lines of code followed by the true next line or another line of the same file;
* ``mathanswer``: a math question followed by its answer or a perturbed number near it;
* ``cloze``: general text up to a sentence's last word followed by that word or another item's word.

The last three reuse the multiple-choice item builders of :mod:`moe_slim.evals.mc_items` (each item
gives its right continuation and one seeded wrong one).

Every task is balanced per class and subsampled to ``per_class`` examples.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.jsonl import read_jsonl
from ..errors import MoeSlimError
from ..prompts import translation_text

EASY_TASKS: tuple[str, ...] = ("langid", "domainid", "codeprose", "genre", "catalogid", "pairmatch")
HARD_TASKS: tuple[str, ...] = ("pairmatch-hard", "codeline", "mathanswer", "cloze")
BUILTIN_TASKS: tuple[str, ...] = EASY_TASKS + HARD_TASKS
SPLIT_PREFERENCE: tuple[str, ...] = ("train", "calibration", "calib", "dev", "validation", "valid", "test")


@dataclass
class Task:
    """Labelled texts for one probe task."""

    name: str
    texts: list[str]
    labels: list[str]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def indices_by_label(self) -> dict[str, list[int]]:
        """The positions of each label's examples, in order."""
        by: dict[str, list[int]] = defaultdict(list)
        for i, lab in enumerate(self.labels):
            by[lab].append(i)
        return dict(by)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))

    def validate(self, min_per_class: int = 2) -> None:
        """One-line errors for tasks a cross-validated probe cannot be trained on."""
        if len(self.texts) != len(self.labels):
            raise MoeSlimError(f"task {self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        classes = self.classes
        if len(classes) < 2:
            only = f" ({classes[0]!r})" if classes else ""
            raise MoeSlimError(f"task {self.name} has {len(classes)} label{only}; a probe needs at least two "
                               "classes (give examples of another label)")
        small = {c: n for c, n in self.counts().items() if n < min_per_class}
        if small:
            c, n = next(iter(small.items()))
            raise MoeSlimError(f"task {self.name}: label {c!r} has {n} example(s); {min_per_class}-fold cross-validation "
                               f"needs at least {min_per_class} per label (give more examples or lower --folds)")


def _label(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        raise MoeSlimError(f"{where}: target {value} is not a class; probes are classifiers (bin numeric targets)")
    if isinstance(value, str) and value.strip():
        return value
    raise MoeSlimError(f"{where}: label must be a non-empty string, integer or boolean, got {value!r}")


def read_task_file(path: str | os.PathLike, name: str | None = None) -> Task:
    """A task from JSONL with ``text`` and ``label`` (or ``target``) on every line."""
    p = Path(path)
    if not p.is_file():
        raise MoeSlimError(f"task file {p} does not exist")
    texts: list[str] = []
    labels: list[str] = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoeSlimError(f"{where} is not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise MoeSlimError(f"{where} has no string 'text' field")
            key = "label" if "label" in rec else "target" if "target" in rec else None
            if key is None:
                raise MoeSlimError(f"{where} has no 'label' (or 'target') field")
            texts.append(rec["text"])
            labels.append(_label(rec[key], where))
    if not texts:
        raise MoeSlimError(f"task file {p} holds no examples")
    return Task(name or p.stem, texts, labels, source=str(p))


def balance(task: Task, per_class: int | None, seed: int) -> Task:
    """At most ``per_class`` examples of every label (a seeded subsample, original order kept)."""
    if per_class is None:
        return task
    rng = random.Random(seed)
    by = task.indices_by_label()
    keep: list[int] = []
    for lab in sorted(by):
        idx = by[lab]
        keep += sorted(rng.sample(idx, per_class)) if len(idx) > per_class else idx
    keep.sort()
    return Task(task.name, [task.texts[i] for i in keep], [task.labels[i] for i in keep], task.source, dict(task.meta))


# --------------------------------------------------------------------------------------------
# built-in tasks from data/


def _domain_file(data_dir: Path, domain: str, split: str | None) -> Path:
    folder = data_dir / domain
    if not folder.is_dir():
        raise MoeSlimError(f"data directory {data_dir} has no {domain}/ folder (build it: moe-slim data build --out {data_dir})")
    if split is not None:
        f = folder / f"{split}.jsonl"
        if not f.is_file():
            have = ", ".join(sorted(p.stem for p in folder.glob("*.jsonl"))) or "none"
            raise MoeSlimError(f"{folder} has no split {split!r} (have: {have})")
        return f
    for s in SPLIT_PREFERENCE:
        if (folder / f"{s}.jsonl").is_file():
            return folder / f"{s}.jsonl"
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MoeSlimError(f"{folder} holds no .jsonl split (build it: moe-slim data build --out {data_dir})")
    return files[0]


def _records(path: Path, limit: int = 200_000) -> list[dict[str, Any]]:
    """The first ``limit`` records of a data file (the data package's reader)."""
    return read_jsonl(path, require=(), allow_empty=True)[:limit]


def _pairs(data_dir: Path, split: str | None) -> tuple[list[dict[str, Any]], Path]:
    f = _domain_file(data_dir, "translation", split)
    pairs = [r for r in _records(f) if isinstance(r.get("src"), str) and isinstance(r.get("ref"), str)
             and isinstance(r.get("tgt_lang"), str) and r["src"].strip() and r["ref"].strip()]
    if not pairs:
        raise MoeSlimError(f"{f} has no translation records with 'src', 'ref' and 'tgt_lang'")
    return pairs, f


def build_langid(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
    pairs, f = _pairs(data_dir, split)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    texts, labels = [], []
    for i, r in enumerate(pairs):
        # alternate sides so an English text and its own translation rarely both appear
        if i % 2 == 0:
            texts.append(r["src"])
            labels.append("en")
        else:
            texts.append(r["ref"])
            labels.append(r["tgt_lang"])
    return balance(Task("langid", texts, labels, source=str(f)), per_class, seed)


def build_domainid(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
    texts, labels, sources = [], [], []
    for dom in ("general", "math", "code"):
        f = _domain_file(data_dir, dom, split)
        sources.append(str(f))
        for r in _records(f):
            if isinstance(r.get("text"), str) and r["text"].strip():
                texts.append(r["text"])
                labels.append(dom)
    return balance(Task("domainid", texts, labels, source=",".join(sources)), per_class, seed)


def build_codeprose(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
    """Code (``code`` domain) versus prose (``general`` domain) texts."""
    texts, labels, sources = [], [], []
    for dom, lab in (("code", "code"), ("general", "prose")):
        f = _domain_file(data_dir, dom, split)
        sources.append(str(f))
        for r in _records(f, limit=max(2000, 4 * per_class)):
            if isinstance(r.get("text"), str) and r["text"].strip():
                texts.append(r["text"])
                labels.append(lab)
    return balance(Task("codeprose", texts, labels, source=",".join(sources)), per_class, seed)


def build_genre(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
    """The ``general`` domain's texts labelled by their source (``origin`` up to the first colon)."""
    f = _domain_file(data_dir, "general", split)
    texts, labels = [], []
    for r in _records(f):
        if isinstance(r.get("text"), str) and r["text"].strip() and isinstance(r.get("origin"), str):
            texts.append(r["text"])
            labels.append(r["origin"].split(":", 1)[0])
    if not texts:
        raise MoeSlimError(f"{f} has no texts with an 'origin' to label their source by")
    return balance(Task("genre", texts, labels, source=str(f)), per_class, seed)


def _catalog(record: dict[str, Any]) -> str | None:
    """The message catalog a translation pair came from: the ``.mo`` file's name in its origin."""
    origin = record.get("origin")
    if not isinstance(origin, str) or not origin.endswith(".mo"):
        return None
    return origin.rsplit("/", 1)[-1][: -len(".mo")]


def _unique_sources(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One pair per English message (the same message appears once per target language)."""
    seen: set[str] = set()
    out = []
    for r in pairs:
        if r["src"] not in seen:
            seen.add(r["src"])
            out.append(r)
    return out


def catalog_classes(data_dir: Path, n: int = 4) -> list[str]:
    """The ``n`` catalogs with the most distinct English messages in *every* translation split.

    Ranking by the smallest count over the splits makes the classes the same whichever split a task
    is built from (whole catalogs held out as ``catalog_*`` splits are not counted).
    """
    folder = data_dir / "translation"
    splits = [p for p in sorted(folder.glob("*.jsonl")) if not p.stem.startswith("catalog_")]
    least: Counter[str] | None = None
    for p in splits:
        pairs = [r for r in _records(p) if isinstance(r.get("src"), str) and r["src"].strip()]
        c = Counter(cat for cat in map(_catalog, _unique_sources(pairs)) if cat)
        least = c if least is None else Counter({k: min(v, c.get(k, 0)) for k, v in least.items() if c.get(k)})
    ranked = sorted((least or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) < 2:
        raise MoeSlimError(f"{folder}: fewer than two message catalogs appear in every split; catalogid needs two")
    return sorted(k for k, _ in ranked[:n])


def build_catalogid(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
    """English messages labelled by the program whose catalog they come from (e.g. gcc versus git)."""
    classes = set(catalog_classes(data_dir))
    pairs, f = _pairs(data_dir, split)
    texts, labels = [], []
    for r in _unique_sources(pairs):
        cat = _catalog(r)
        if cat in classes:
            texts.append(r["src"])
            labels.append(cat)
    return balance(Task("catalogid", texts, labels, source=str(f)), per_class, seed)


def build_pairmatch(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
    pairs, f = _pairs(data_dir, split)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    by_lang: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(pairs):
        by_lang[r["tgt_lang"]].append(i)
    texts, labels = [], []
    for lang, idx in sorted(by_lang.items()):
        if len(idx) < 4:
            continue
        half = len(idx) // 2
        for i in idx[:half]:  # matched pairs
            r = pairs[i]
            texts.append(translation_text(r["src"], r["ref"], lang))
            labels.append("match")
        other = idx[half:]
        for k, i in enumerate(other):  # each src with the ref of the next pair (a derangement)
            r, r2 = pairs[i], pairs[other[(k + 1) % len(other)]]
            if r2["ref"].strip() == r["ref"].strip():
                continue
            texts.append(translation_text(r["src"], r2["ref"], lang))
            labels.append("mismatch")
    return balance(Task("pairmatch", texts, labels, source=str(f)), per_class, seed)


def build_pairmatch_hard(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
    pairs, f = _pairs(data_dir, split)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    by_lang: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in pairs:
        by_lang[r["tgt_lang"]].append(r)
    langs = sorted(by_lang)
    want = per_class // max(1, len(langs)) + 1  # per language and class
    texts, labels = [], []
    for lang in langs:
        pool = by_lang[lang][: 6 * want + 8]  # candidates for hard negatives
        if len(pool) < 4:
            continue
        words = [set(r["ref"].lower().split()) for r in pool]
        for k, r in enumerate(pool[: 2 * want]):
            if k % 2 == 0:
                texts.append(translation_text(r["src"], r["ref"], lang))
                labels.append("match")
                continue
            n = len(r["ref"])
            j = max((i for i in range(len(pool)) if i != k and pool[i]["ref"].strip() != r["ref"].strip()),
                    key=lambda i: (len(words[i] & words[k]), -abs(len(pool[i]["ref"]) - n)))
            texts.append(translation_text(r["src"], pool[j]["ref"], lang))
            labels.append("mismatch")
    return balance(Task("pairmatch-hard", texts, labels, source=str(f)), per_class, seed)


_MC_FOR = {"codeline": ("code", "build_code_next_line"), "mathanswer": ("math", "build_math_choice"),
           "cloze": ("general", "build_general_cloze")}


def _build_from_mc(name: str) -> Any:
    def build(data_dir: Path, split: str | None, per_class: int, seed: int) -> Task:
        from ..evals import mc_items

        domain, fn = _MC_FOR[name]
        f = _domain_file(data_dir, domain, split)
        recs = [dict(r, id=str(r.get("id", i))) for i, r in enumerate(_records(f, limit=max(200, 8 * per_class)))]
        items = getattr(mc_items, fn)(recs)
        rng = random.Random(seed)
        texts, labels = [], []
        for k, it in enumerate(items):
            right = k % 2 == 0  # each item gives one example: alternately its right or a wrong continuation
            wrong = [c for i, c in enumerate(it["choices"]) if i != it["gold"]]
            texts.append(it["query"] + (it["choices"][it["gold"]] if right else rng.choice(wrong)))
            labels.append("right" if right else "wrong")
        return balance(Task(name, texts, labels, source=str(f)), per_class, seed)

    return build


_BUILDERS = {"langid": build_langid, "domainid": build_domainid, "codeprose": build_codeprose, "genre": build_genre,
             "catalogid": build_catalogid, "pairmatch": build_pairmatch,
             "pairmatch-hard": build_pairmatch_hard, **{n: _build_from_mc(n) for n in _MC_FOR}}


def builtin_task(name: str, data_dir: str | os.PathLike = "data", *, split: str | None = None,
                 per_class: int = 100, seed: int = 0) -> Task:
    if name not in _BUILDERS:
        raise MoeSlimError(f"unknown built-in task {name!r}; built-ins: {', '.join(BUILTIN_TASKS)} (or give a .jsonl path)")
    d = Path(data_dir)
    if not d.is_dir():
        raise MoeSlimError(f"data directory {d} does not exist (build it: moe-slim data build --out {d}, "
                           "or give task .jsonl files)")
    task = _BUILDERS[name](d, split, per_class, seed)
    task.meta.update({"builtin": name, "data_dir": str(d), "seed": seed, "per_class": per_class})
    return task


def load_tasks(spec: str | list[str], data_dir: str | os.PathLike = "data", *, split: str | None = None,
               per_class: int | None = 100, seed: int = 0) -> list[Task]:
    """Tasks from a comma list of built-in names and/or JSONL paths; each validated."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise MoeSlimError(f"no tasks given; name built-ins ({', '.join(BUILTIN_TASKS)}) or .jsonl files")
    tasks: list[Task] = []
    for s in names:
        if s in _BUILDERS:
            task = builtin_task(s, data_dir, split=split, per_class=per_class or 100, seed=seed)
        elif s.endswith(".jsonl") or os.path.sep in s or Path(s).exists():
            task = balance(read_task_file(s), per_class, seed)
        else:
            raise MoeSlimError(f"unknown task {s!r}; built-ins: {', '.join(BUILTIN_TASKS)}, or give a .jsonl path")
        if any(t.name == task.name for t in tasks):
            raise MoeSlimError(f"two tasks are named {task.name!r}; rename one of the files")
        task.validate()
        tasks.append(task)
    return tasks


def parse_weights(spec: str | None, tasks: list[Task]) -> dict[str, float]:
    """``t1=2,t2=1`` to a weight per task (unnamed tasks get 1); one-line errors for bad input."""
    names = [t.name for t in tasks]
    weights = {n: 1.0 for n in names}
    if not spec:
        return weights
    for part in spec.split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep:
            raise MoeSlimError(f"task weight {part!r} must look like name=number, e.g. langid=2")
        if key not in weights:
            raise MoeSlimError(f"task weight for {key!r}, which is not among the tasks ({', '.join(names)})")
        try:
            w = float(val)
        except ValueError:
            raise MoeSlimError(f"task weight {part!r}: {val!r} is not a number") from None
        if not w >= 0 or w == float("inf"):
            raise MoeSlimError(f"task weight {part!r} must be a finite number >= 0")
        weights[key] = w
    if sum(weights.values()) <= 0:
        raise MoeSlimError("task weights are all zero; give at least one task a positive weight")
    return weights
