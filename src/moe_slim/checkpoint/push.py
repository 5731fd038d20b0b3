"""Publishing an output: ``huggingface_hub``'s upload of a checkpoint folder, with the card's evaluation
section filled from a results JSON when one is given. The folder itself is never changed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import MoeSlimError
from ..modeling.hub import REPO_ID, hub_unavailable
from ..outputs import MARKER
from .cards import with_evaluation


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, results: str | os.PathLike | None = None,
                private: bool = False, token: str | None = None, message: str | None = None) -> str:
    """Upload ``directory`` (a checkpoint moe_slim wrote) to the Hub repository ``repo_id`` (created if
    missing); with ``results`` (``moe-slim eval``'s JSON) the uploaded card carries the scores. Returns
    the commit URL. One-line errors, before any upload, for a bad folder or id, or an unreachable hub."""
    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "README.md").is_file():
        raise MoeSlimError(f"{d} is not a checkpoint with a model card (config.json and README.md)")
    if not REPO_ID.match(repo_id):
        raise MoeSlimError(f"'{repo_id}' is not a Hub repository id (OWNER/NAME)")
    card = (d / "README.md").read_text()
    if results is not None:
        try:
            card = with_evaluation(card, json.loads(Path(results).read_text()))
        except (OSError, ValueError) as exc:
            raise MoeSlimError(f"results {results} is not a results JSON of moe-slim eval ({exc})") from exc
    why = hub_unavailable()
    if why:
        raise MoeSlimError(f"pushing to {repo_id} needs the Hugging Face hub, which is {why}; push from a machine "
                           "that reaches it (the folder is complete as it is)")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    files = sorted(f for f in d.rglob("*") if f.is_file() and f.name not in (MARKER, "README.md")
                   and not any(p.startswith(".") for p in f.relative_to(d).parts))
    ops: list[Any] = [CommitOperationAdd(str(f.relative_to(d)), str(f)) for f in files]
    ops.append(CommitOperationAdd("README.md", card.encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=message or f"Upload {d.name} (moe_slim)")
    except Exception as exc:  # huggingface_hub raises many kinds (auth, network, permissions)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoeSlimError(f"could not push to {repo_id}: {first}") from exc
    return str(getattr(info, "commit_url", info))
