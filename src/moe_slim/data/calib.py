"""Calibration input for ``moe-slim observe --calib SPEC``: texts per domain, plus mix weights.

A SPEC is one of:

(a) ``general=a.jsonl,translation=b.jsonl[@50k]``: one JSONL file (objects with a ``text``
    field) per domain; any domain name works, so users can add their own;
(b) a directory: a built data dir (``<domain>/<split>.jsonl``) or a folder of ``<domain>.jsonl``
    files; a single ``<domain>.jsonl`` file also works;
(c) a mix spec over the built data dir: ``translation=3,general=1@50k`` or a YAML mix file
    (see :mod:`moe_slim.data.mixspec`); the weights and budget come back with the texts;
(d) ``hf:NAME[:config][:split]``: a Hugging Face dataset with a ``text`` column (needs the
    network; offline it is a one-line error). ``domain=hf:NAME...`` works inside form (a).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MoeSlimError
from .jsonl import MANIFEST, read_jsonl
from .mixspec import MixSpec, parse_mix_text, parse_mix_yaml, parse_tokens

_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")
_DOMAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
_SPEC_HELP = ("give domain=FILE.jsonl,..., a directory, a mix spec like translation=3,general=1@50k, "
              "a YAML mix file, or hf:NAME[:config][:split]")


def approx_tokens(text: str) -> int:
    """A tokenizer-free token estimate (about 4 characters per token)."""
    return max(1, len(text) // 4)


@dataclass
class Calibration(Mapping[str, list[str]]):
    """Texts per domain (a read-only mapping domain -> texts), with the mix that asked for them.

    ``weights`` are normalised to sum to 1 (None when the spec gave no weights); ``tokens`` is the
    budget (None when none was given); ``sources`` says where each domain's texts came from.
    """

    texts: dict[str, list[str]]
    weights: dict[str, float] | None = None
    tokens: int | None = None
    sources: dict[str, str] = field(default_factory=dict)
    spec: str = ""

    def __getitem__(self, domain: str) -> list[str]:
        return self.texts[domain]

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def domains(self) -> list[str]:
        return list(self.texts)

    def token_budget(self) -> dict[str, int] | None:
        """Tokens per domain: weight x budget (equal weights when none were given), or None."""
        if self.tokens is None:
            return None
        weights = self.weights or {d: 1 / len(self.texts) for d in self.texts}
        return {d: int(round(weights.get(d, 0.0) * self.tokens)) for d in self.texts}

    def take(self, count_tokens: Callable[[str], int] = approx_tokens) -> dict[str, list[str]]:
        """The texts trimmed to each domain's token budget (in file order; at least one text per
        domain with a positive budget). Without a budget, all texts."""
        budget = self.token_budget()
        if budget is None:
            return {d: list(t) for d, t in self.texts.items()}
        out: dict[str, list[str]] = {}
        for d, texts in self.texts.items():
            kept, used = [], 0
            for t in texts:
                if used >= budget[d]:
                    break
                kept.append(t)
                used += count_tokens(t)
            out[d] = kept
        return out


def _texts_of(path: Path, limit: int | None) -> list[str]:
    texts = [r["text"] for r in read_jsonl(path) if r["text"].strip()]
    if not texts:
        raise MoeSlimError(f"{path} has only empty 'text' fields")
    return texts[:limit] if limit else texts


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _load_hf(spec: str, limit: int | None) -> list[str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise MoeSlimError(f"bad Hugging Face spec {spec!r} (write hf:NAME[:config][:split])")
    name = parts[0]
    config = parts[1] or None if len(parts) > 1 else None
    split = parts[2] or "train" if len(parts) > 2 else "train"
    if _offline():
        raise MoeSlimError(f"{spec} needs the Hugging Face Hub but this run is offline "
                           "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set); export the texts to JSONL and pass "
                           "domain=FILE.jsonl instead")
    try:
        import datasets
    except ImportError:
        raise MoeSlimError(f"{spec} needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset, bad config: all one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoeSlimError(f"could not load Hugging Face dataset {spec}: {first[:200]}") from None
    if "text" not in ds.column_names:
        raise MoeSlimError(f"Hugging Face dataset {spec} has no 'text' column "
                           f"(columns: {', '.join(ds.column_names)})")
    n = len(ds) if not limit else min(limit, len(ds))
    texts = [t for t in ds.select(range(n))["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise MoeSlimError(f"Hugging Face dataset {spec} has no non-empty texts")
    return texts


def _domain_name(name: str, spec: str) -> str:
    if not _DOMAIN.match(name):
        raise MoeSlimError(f"bad domain name {name!r} in calibration spec {spec!r} "
                           "(letters, digits, _ . -; starting with a letter)")
    return name


def _built_domains(data_dir: Path, split: str) -> dict[str, Path]:
    return {d.name: d / f"{split}.jsonl" for d in sorted(data_dir.iterdir())
            if d.is_dir() and (d / f"{split}.jsonl").is_file()}


def _from_dir(path: Path, split: str, limit: int | None, spec: str) -> Calibration:
    built = _built_domains(path, split)
    if built or (path / MANIFEST).is_file():
        if not built:
            raise MoeSlimError(f"{path} has no <domain>/{split}.jsonl files (is {split!r} the right split?)")
        files = built
    else:
        files = {p.stem: p for p in sorted(path.glob("*.jsonl"))}
        if not files:
            raise MoeSlimError(f"{path} has no <domain>.jsonl files and no <domain>/{split}.jsonl files "
                               "(build data with moe-slim data build, or add JSONL files)")
    texts = {_domain_name(d, spec): _texts_of(p, limit) for d, p in files.items()}
    return Calibration(texts, sources={d: str(p) for d, p in files.items()}, spec=spec)


def _from_mix(mix: MixSpec, data_dir: str | os.PathLike, split: str, limit: int | None, spec: str) -> Calibration:
    base = Path(data_dir)
    if not base.is_dir():
        raise MoeSlimError(f"mix spec {spec!r} reads the built data in {base}, which does not exist "
                           f"(run moe-slim data build --out {base}, or pass domain=FILE.jsonl)")
    have = _built_domains(base, split)
    texts, sources = {}, {}
    for domain in mix.domains:
        if domain not in have:
            raise MoeSlimError(f"domain {domain!r} has no {split} split in {base} "
                               f"(available: {', '.join(have) or 'none'}; or pass {domain}=FILE.jsonl)")
        texts[domain] = _texts_of(have[domain], limit)
        sources[domain] = str(have[domain])
    norm = mix.normalized().weights
    return Calibration(texts, weights={d: norm[d] for d in texts}, tokens=mix.tokens, sources=sources, spec=spec)


def _from_files(spec: str, limit: int | None) -> Calibration:
    body, at, budget = spec.partition("@")
    tokens = parse_tokens(budget, f"token budget {budget!r} in {spec!r}") if at else None
    texts, sources = {}, {}
    for part in body.split(","):
        name, eq, target = (x.strip() for x in part.partition("="))
        if not eq or not target:
            raise MoeSlimError(f"calibration entry {part.strip()!r} in {spec!r} is not domain=FILE")
        name = _domain_name(name, spec)
        if name in texts:
            raise MoeSlimError(f"domain {name!r} appears twice in calibration spec {spec!r}")
        if target.startswith("hf:"):
            texts[name] = _load_hf(target, limit)
        else:
            texts[name] = _texts_of(Path(target), limit)
        sources[name] = target
    return Calibration(texts, tokens=tokens, sources=sources, spec=spec)


def load_calibration(spec: str | os.PathLike, *, data_dir: str | os.PathLike = "data", split: str = "calibration",
                     limit: int | None = None) -> Calibration:
    """Texts per domain from a calibration SPEC (see the module docstring). ``limit`` caps the
    number of texts per domain (first ones). Bad specs, missing or empty files and JSONL lines
    without ``text`` are one-line MoeSlimErrors."""
    text = str(spec).strip()
    if not text:
        raise MoeSlimError(f"empty calibration spec ({_SPEC_HELP})")
    if text.startswith("hf:"):
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", text[3:].split(":")[0].rsplit("/", 1)[-1]) or "hf"
        if not name[0].isalpha():
            name = "hf_" + name
        return Calibration({name: _load_hf(text, limit)}, sources={name: text}, spec=text)
    path = Path(text)
    if path.is_dir():
        return _from_dir(path, split, limit, text)
    if path.is_file():
        if path.suffix.lower() in {".yaml", ".yml"}:
            return _from_mix(parse_mix_yaml(path), data_dir, split, limit, text)
        if path.suffix.lower() == ".jsonl":
            domain = _domain_name(path.stem, text)
            return Calibration({domain: _texts_of(path, limit)}, sources={domain: str(path)}, spec=text)
        raise MoeSlimError(f"calibration file {path} is neither .jsonl nor a .yaml mix spec ({_SPEC_HELP})")
    if "=" in text:
        values = [p.partition("=")[2] for p in text.partition("@")[0].split(",")]
        numeric = [bool(_NUMBER.match(v)) for v in values]
        if all(numeric):
            return _from_mix(parse_mix_text(text), data_dir, split, limit, text)
        if not any(numeric):
            return _from_files(text, limit)
        raise MoeSlimError(f"calibration spec {text!r} mixes weights and files (use domain=FILE.jsonl for all "
                           "entries, or domain=WEIGHT for all entries over the built data)")
    if text.lower().endswith((".jsonl", ".yaml", ".yml")) or os.sep in text:
        raise MoeSlimError(f"calibration input {text} not found")
    raise MoeSlimError(f"calibration spec {text!r} is not understood ({_SPEC_HELP})")


def calibration_texts(calib: str | dict[str, list[str]], data_dir: str | os.PathLike = "data"
                      ) -> tuple[dict[str, list[str]], dict[str, int] | None]:
    """Texts per domain from a calibration spec (or a dict of texts), and the spec's token budget per domain."""
    if isinstance(calib, dict):
        for d, texts in calib.items():
            if not texts:
                raise MoeSlimError(f"calibration domain '{d}' has no text")
        return calib, None
    cal = load_calibration(calib, data_dir=data_dir)
    budget = None
    if getattr(cal, "tokens", None):
        weights = cal.weights or {d: 1.0 for d in cal.texts}
        total = sum(weights.values())
        budget = {d: int(cal.tokens * w / total) for d, w in weights.items()}
    return cal.texts, budget


def calibration_inputs(calib: Any) -> list[str]:
    """The files and directories a calibration spec reads (for the output guard): ``a.jsonl``,
    ``general=a.jsonl,code=b.jsonl``, a directory of ``<domain>.jsonl`` or a YAML mix."""
    if not isinstance(calib, str):
        return []
    text = calib.strip()
    candidates = [text] + [part.partition("=")[2] or part for part in text.partition("@")[0].split(",")]
    return [c for c in dict.fromkeys(candidates) if c and not c.startswith("hf:") and Path(c).exists()]
