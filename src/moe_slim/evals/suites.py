"""Named evaluation suites: which tasks run, on how many items.

A suite's ``version`` changes whenever what it measures changes (its tasks, limits, prompts, or the
MC item builder), so results carrying the same suite version are comparable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MoeSlimError
from .mc_items import BUILDER_VERSION, MC_TASKS

GENERATIVE_TASKS: tuple[str, ...] = ("translation", "math_gen", "perplexity")
BUILTIN_TASKS: tuple[str, ...] = ("translation", *MC_TASKS, "math_gen", "perplexity")
#: Names that stand for several tasks.
TASK_ALIASES: dict[str, tuple[str, ...]] = {"mc": MC_TASKS, "all": BUILTIN_TASKS}


@dataclass(frozen=True)
class Suite:
    """A named preset. ``None`` limits mean every item of the test split."""

    name: str
    version: int
    tasks: tuple[str, ...]
    description: str
    translation_per_pair: int | None = None
    mc_limit: int | None = None
    math_limit: int | None = None
    math_max_new_tokens: int = 256
    ppl_docs: int | None = None
    ppl_seq_len: int = 512

    @property
    def version_tag(self) -> str:
        return f"{self.name}/v{self.version}+mc{BUILDER_VERSION}"

    def with_limit(self, limit: int | None) -> Suite:
        """The same suite with every item limit set to ``limit`` (per pair for translation, per domain for ppl)."""
        if limit is None:
            return self
        if limit < 1:
            raise MoeSlimError(f"--limit must be a positive number of items, not {limit}")
        return dataclasses.replace(self, translation_per_pair=limit, mc_limit=limit, math_limit=limit,
                                   ppl_docs=limit)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("quick", 1, BUILTIN_TASKS,
              "a few minutes on CPU for a 10-50M model: 50 sentences per pair, 100 items per MC task, "
              "30 math problems, perplexity on 50 documents per domain",
              translation_per_pair=50, mc_limit=100, math_limit=30, math_max_new_tokens=192, ppl_docs=50,
              ppl_seq_len=512),
        Suite("full", 1, BUILTIN_TASKS, "every task on the whole test split"),
        Suite("translation", 1, ("translation",), "translation only (BLEU, chrF, chrF++), whole test split"),
        Suite("mc", 1, MC_TASKS, "the four multiple-choice tasks, whole test split"),
    )
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise MoeSlimError(f"unknown suite {name!r} (choose from {', '.join(SUITES)})")
    return SUITES[name]


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names with aliases expanded, duplicates dropped, order kept; other names are left for lm-eval."""
    out: list[str] = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name.startswith("moe_slim_") and name[len("moe_slim_"):] in MC_TASKS:  # our lm-eval name
            name = name[len("moe_slim_"):]
        for t in TASK_ALIASES.get(name, (name,)):
            if t not in out:
                out.append(t)
    if not out:
        raise MoeSlimError("no tasks given (name at least one, e.g. --tasks translation,mc)")
    return out
