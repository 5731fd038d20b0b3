"""Multiple-choice items derived from the built test splits: translation choice, math answer choice,
code next line and general cloze (seeded, so the same data gives the same items).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from ..prompts import translation_prompt, translation_target

BUILDER_VERSION = 2
MC_SEED = 1234
N_CHOICES = 4

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
