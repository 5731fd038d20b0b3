"""Where the built data lives when nobody says: the same answer from any working directory.

``$MOE_SLIM_DATA`` if set; else ``./data`` when it holds a build (a ``manifest.json``); else the
``data/`` of the moe_slim checkout this package runs from; else ``./data`` (whose absence the
commands then report in one line). Every command's ``--data-dir`` and every API ``data_dir=None``
use this.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA = "MOE_SLIM_DATA"
CHECKOUT_DATA = Path(__file__).resolve().parents[3] / "data"


def default_data_dir() -> Path:
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env)
    here = Path("data")
    if (here / "manifest.json").is_file():
        return here
    if (CHECKOUT_DATA / "manifest.json").is_file():
        return CHECKOUT_DATA
    return here


def data_dir_or_default(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()
