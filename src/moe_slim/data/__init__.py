"""Offline data for calibration, training and evaluation: four domains, deterministic splits.

``moe-slim data build --out data`` writes ``data/<domain>/<split>.jsonl`` and ``data/manifest.json``
(see calibration/README.md). The pieces:

- :mod:`.mo` reads gettext catalogs; :mod:`.filters` keeps usable translation pairs;
- :mod:`.sources` reads each installed source; :mod:`.splits` dedupes and splits;
- :mod:`.build` orchestrates and writes the manifest; :mod:`.formats` defines the math format;
- :mod:`.mixspec` parses mix specs; :mod:`.calib` loads calibration input for ``observe``.
"""

from .build import BuildOptions, build_data
from .calib import Calibration, approx_tokens, load_calibration
from .formats import (
    DOMAINS,
    SPLITS,
    extract_math_answer,
    math_prompt,
    math_target,
    math_text,
    normalize_math_answer,
)
from .jsonl import load_split, read_jsonl, read_manifest
from .mixspec import MixSpec, parse_mix

__all__ = [
    "BuildOptions", "build_data", "Calibration", "approx_tokens", "load_calibration", "DOMAINS", "SPLITS",
    "extract_math_answer", "math_prompt", "math_target", "math_text", "normalize_math_answer",
    "load_split", "read_jsonl", "read_manifest", "MixSpec", "parse_mix",
]
