"""Mix specs: domain weights plus an optional token budget.

Text form: ``general=0.25,math=0.25,code=0.25,translation=0.25@200k`` (weights need not sum to 1;
the budget takes ``k``/``M``/``G`` suffixes and is optional). YAML form, given as a file path::

    weights: {general: 1, translation: 3}
    tokens: 200k        # or 200000; optional

Weights are non-negative and not all zero. Anything else is a one-line MoeSlimError naming the
bad part.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoeSlimError

_DOMAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
_TOKENS = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kKmMgG]?)\s*$")
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
_HELP = "write it like general=1,translation=3@200k"


@dataclass(frozen=True)
class MixSpec:
    """Weights per domain (as given) and an optional token budget."""

    weights: dict[str, float]
    tokens: int | None = None

    def normalized(self) -> MixSpec:
        """The same mix with weights summing to 1."""
        total = sum(self.weights.values())
        return MixSpec({k: v / total for k, v in self.weights.items()}, self.tokens)

    @property
    def domains(self) -> list[str]:
        """Domains with a positive weight, in the order given."""
        return [k for k, v in self.weights.items() if v > 0]

    def token_budget(self) -> dict[str, int] | None:
        """Tokens per domain (normalised weight x budget, rounded), or None without a budget."""
        if self.tokens is None:
            return None
        return {k: int(round(w * self.tokens)) for k, w in self.normalized().weights.items()}

    def __str__(self) -> str:
        text = ",".join(f"{k}={v:g}" for k, v in self.weights.items())
        return f"{text}@{self.tokens}" if self.tokens is not None else text


def parse_tokens(text: str | int | float, where: str = "token budget") -> int:
    """``200k`` -> 200000, ``1.5M`` -> 1500000, ``50000`` -> 50000."""
    if isinstance(text, bool):
        raise MoeSlimError(f"bad {where} {text!r} (give a number such as 200k or 1.5M)")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text <= 0 or int(text) != text:
            raise MoeSlimError(f"bad {where} {text!r} (give a positive whole number such as 200k)")
        return int(text)
    m = _TOKENS.match(str(text))
    if not m:
        raise MoeSlimError(f"bad {where} {text!r} (give a number with an optional k/M/G suffix, e.g. 200k)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise MoeSlimError(f"bad {where} {text!r} (it must be a positive whole number of tokens)")
    return int(value)


def _weight(name: str, value: object, where: str) -> float:
    if isinstance(value, bool):
        raise MoeSlimError(f"bad weight for {name!r} in {where}: {value!r} (give a non-negative number)")
    try:
        w = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MoeSlimError(f"bad weight {str(value)!r} for {name!r} in {where} (give a non-negative number)") from None
    if not math.isfinite(w) or w < 0:
        raise MoeSlimError(f"bad weight {str(value)!r} for {name!r} in {where} (weights must be non-negative numbers)")
    return w


def _check_domain(name: object, where: str) -> str:
    if not isinstance(name, str) or not _DOMAIN.match(name):
        raise MoeSlimError(f"bad domain name {name!r} in {where} (letters, digits, _ . -; starting with a letter)")
    return name


def _finish(weights: dict[str, float], tokens: int | None, where: str) -> MixSpec:
    if not weights:
        raise MoeSlimError(f"mix spec {where} names no domains ({_HELP})")
    if sum(weights.values()) <= 0:
        raise MoeSlimError(f"mix spec {where}: the weights are all zero (give at least one domain a positive weight)")
    return MixSpec(weights, tokens)


def parse_mix_text(text: str) -> MixSpec:
    """Parse the text form ``domain=weight,...[@tokens]``."""
    where = repr(text)
    body, at, budget = text.strip().partition("@")
    if "@" in budget:
        raise MoeSlimError(f"mix spec {where} has more than one '@' ({_HELP})")
    tokens = parse_tokens(budget, f"token budget {budget!r} in {where}") if at else None
    weights: dict[str, float] = {}
    for part in body.split(","):
        part = part.strip()
        if not part:
            raise MoeSlimError(f"mix spec {where} has an empty entry ({_HELP})")
        name, eq, value = part.partition("=")
        if not eq:
            raise MoeSlimError(f"mix spec entry {part!r} in {where} has no '=' ({_HELP})")
        name = _check_domain(name.strip(), where)
        if name in weights:
            raise MoeSlimError(f"domain {name!r} appears twice in mix spec {where}")
        weights[name] = _weight(name, value.strip(), where)
    return _finish(weights, tokens, where)


def parse_mix_yaml(path: str | os.PathLike) -> MixSpec:
    """Parse a YAML mix spec file (``weights:`` mapping, optional ``tokens:``)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MoeSlimError(f"cannot read mix spec {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise MoeSlimError(f"mix spec {p} is not valid YAML" + (f" (line {line + 1})" if line is not None else "")) from None
    where = str(p)
    if not isinstance(data, dict):
        raise MoeSlimError(f"mix spec {p} must be a mapping with 'weights:' (and optionally 'tokens:')")
    unknown = sorted(set(data) - {"weights", "tokens", "description", "name"})
    if unknown:
        raise MoeSlimError(f"mix spec {p} has unknown key(s) {', '.join(map(str, unknown))} (use weights, tokens)")
    raw = data.get("weights")
    if not isinstance(raw, dict):
        raise MoeSlimError(f"mix spec {p} needs 'weights:' as a mapping of domain: weight")
    weights = {_check_domain(k, where): _weight(str(k), v, where) for k, v in raw.items()}
    tokens = data.get("tokens")
    return _finish(weights, None if tokens is None else parse_tokens(tokens, f"tokens in {where}"), where)


def looks_like_yaml_path(text: str) -> bool:
    return text.lower().endswith((".yaml", ".yml")) or (("=" not in text) and Path(text).is_file())


def parse_mix(text_or_path: str | os.PathLike | MixSpec) -> MixSpec:
    """A MixSpec from the text form or from a YAML file path."""
    if isinstance(text_or_path, MixSpec):
        return text_or_path
    text = str(text_or_path).strip()
    if not text:
        raise MoeSlimError(f"empty mix spec ({_HELP})")
    if looks_like_yaml_path(text):
        if not Path(text).is_file():
            raise MoeSlimError(f"mix spec file {text} not found")
        return parse_mix_yaml(text)
    return parse_mix_text(text)
