"""Write the checkpoint of a sweep's best point for a target, through the prune/merge API.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .store import DB_NAME, read_rows


def write_best(out: str | os.PathLike, target: str, log: Callable[[str], None] | None = print) -> dict[str, Any] | None:
    """Write the checkpoint of the best point for ``target`` to ``OUT/best`` (through the prune/merge API)."""
    from .targets import best_for_target

    rows, meta = read_rows(Path(out) / DB_NAME)
    best = best_for_target(rows, target, writable_only=True)
    if best is None or best["kind"] == "baseline":
        (log or print)(f"write_best: no pruned or merged point meets {target}; nothing written")
        return None
    dest = Path(out) / "best"
    cfg = best["config"]
    mix = cfg.get("mix")
    if best["kind"] == "prune":
        from ..api import prune_checkpoint

        prune_checkpoint(meta["model"], meta["stats_dir"], dest, criterion=best["method"], ratio=best["ratio"],
                         mix=mix, budget=best["budget"], floor=cfg.get("floor"), seed=cfg.get("seed", 0),
                         overwrite=True)
    else:
        from ..api import merge_checkpoint
        from .targets import merge_choices

        mc = cfg.get("merge") or {}
        merge_checkpoint(meta["model"], dest, method=best["method"], ratio=best["ratio"], stats_path=meta["stats_dir"],
                         mix=mix, overwrite=True, **{"max_tokens": 4096, "align_tokens": 2048,
                                                     "seed": cfg.get("seed", 0), **merge_choices(mc)})
    (log or print)(f"write_best: {best['method']} ratio {best['ratio']:g} mix {best['mix']} -> {dest}")
    if cfg.get("recover"):
        from .targets import command_for

        cmd = command_for(best, meta, out=str(dest))
        (log or print)(f"write_best: the sweep evaluated it after recovery; recover it with: {cmd.split(' && ', 1)[1]}")
    return {"key": best["key"], "out": str(dest)}
