"""Datasets of moe_slim's lm-eval tasks, so the task YAMLs in this directory work from any directory.

lm-eval resolves ``custom_dataset: !function moe_slim_tasks.<task>`` relative to the YAML, then calls
the function with the task's metadata: ``lm_eval --include_path /path/to/evals --tasks
moe_slim_translation_choice --metadata '{"data_dir": "/path/to/data"}'``. Without ``data_dir`` the
built data is found as moe_slim finds it ($MOE_SLIM_DATA, ./data, or the checkout's data/). The items
are the ones ``moe-slim eval`` scores: derived from the test split with fixed seeds, cached in ~/.cache/moe_slim/mc ($MOE_SLIM_CACHE).
"""

from __future__ import annotations

from typing import Any


def _dataset(task: str, data_dir: str | None = None, **_: Any) -> Any:
    import datasets

    from moe_slim.data.paths import data_dir_or_default
    from moe_slim.evals.mc import prepare_mc_data

    info = prepare_mc_data(task, data_dir_or_default(data_dir))
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=info["path"], split="train")})


def translation_choice(**kwargs: Any) -> Any:
    return _dataset("translation_choice", **kwargs)


def math_choice(**kwargs: Any) -> Any:
    return _dataset("math_choice", **kwargs)


def code_next_line(**kwargs: Any) -> Any:
    return _dataset("code_next_line", **kwargs)


def general_cloze(**kwargs: Any) -> Any:
    return _dataset("general_cloze", **kwargs)
