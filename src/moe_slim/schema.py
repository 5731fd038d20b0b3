"""Validating YAML specs (sweeps, recipes) with pydantic, failing in one line that names the key.

``Strict`` models forbid unknown keys; :func:`validate` turns the first pydantic error into a
:class:`~moe_slim.errors.MoeSlimError` such as ``unknown key 'limt' in eval (known: ...)`` or
``recover.sft.steps must be an integer >= 1 (got 0)``, so a bad spec fails before any work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from .data.mixspec import parse_tokens
from .errors import MoeSlimError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A spec section: unknown keys are errors, values are checked as they are read."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _tokens(value: Any) -> int:
    try:
        return parse_tokens(value)
    except MoeSlimError as exc:
        raise ValueError(str(exc)) from None


#: the largest integer a spec or an option takes (a count, a seed): a larger one is a slip, and some ran for ever
MAX_INT = 2**31 - 1
#: the longest sequence (tokens) and the largest token budget taken, far beyond any model's context
MAX_SEQ_LEN, MAX_TOKENS = 1 << 20, 10**12
#: a token count written as 4096, "32k" or "1.5M"
Tokens = Annotated[int, BeforeValidator(_tokens), Field(le=MAX_TOKENS)]
PositiveInt = Annotated[int, Field(strict=True, ge=1, le=MAX_INT)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0, le=MAX_INT)]
SeqLen = Annotated[int, Field(strict=True, ge=1, le=MAX_SEQ_LEN)]


class EvalSettings(Strict):
    """What a point or a recipe's result is scored on (:func:`moe_slim.evals.run.evaluate`)."""

    suite: str = "quick"
    tasks: list[str] | None = None
    limit: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    translation_testset: str | None = None
    split: str = "test"  # or catalog_test: translation from whole catalogs unseen in training

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def one_line(exc: ValidationError, what: str, model: type[BaseModel]) -> MoeSlimError:
    """The first validation error of ``exc`` as one line naming the key (an unknown key first: a typo
    also explains the key it was meant to be being missing)."""
    errors = exc.errors(include_url=False)
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    where, kind, got = _where(loc), err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _where(loc[:-1])
        known = ", ".join(_known_keys(model, loc[:-1]))
        return MoeSlimError(f"unknown key '{loc[-1]}'" + (f" in {parent}" if parent else f" in the {what}")
                            + (f" (known: {known})" if known else ""))
    if kind == "missing":
        return MoeSlimError(f"{what}: '{where}' is required")
    if kind == "value_error":
        return MoeSlimError(f"{what}: {ctx.get('error', err['msg'])}" if not where else
                            f"{what}: {where}: {ctx.get('error', err['msg'])}")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "")
        noun = "an integer" if isinstance(got, int) and not isinstance(got, bool) else "a number"
        return MoeSlimError(f"{where} must be {noun} {op} {bound} (got {got!r})")
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return MoeSlimError(f"{where} must be an integer >= 1 (got {got!r})" if "1" in str(ctx) else
                            f"{where} must be an integer (got {got!r})")
    return MoeSlimError(f"{what}: {where} {err['msg'][0].lower()}{err['msg'][1:]} (got {got!r})")


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The mapping in a YAML file (safe loader); one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise MoeSlimError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MoeSlimError(f"{what} {p} is not valid YAML: {str(exc).splitlines()[0]}") from None


def validate(model: type[M], raw: Any, what: str) -> M:
    """``raw`` (a dict from YAML) as ``model``; a one-line MoeSlimError for the first problem."""
    if not isinstance(raw, dict):
        raise MoeSlimError(f"a {what} is a YAML mapping (got {type(raw).__name__})")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise one_line(exc, what, model) from None
