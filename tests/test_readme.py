"""The README's code is what a new user types first: its ```python blocks run, in order, as one
session from a directory that holds the repository's ``models/`` and ``data/`` (as the repository
root does), and its recipe YAML is a valid recipe."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import yaml

import moe_slim
import moe_slim.api
from moe_slim.recipe.spec import Recipe
from moe_slim.schema import validate

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_api_names_are_the_functions_not_submodules():
    """``moe_slim.api.observe`` once was the submodule api/observe.py, which shadowed the function."""
    for name in moe_slim.api.__all__:
        assert not isinstance(getattr(moe_slim.api, name), types.ModuleType), name
    for name in moe_slim.__all__:
        if name != "__version__":
            assert callable(getattr(moe_slim, name)), name
    from moe_slim.experts.observe import observe
    from moe_slim.recover.loop import sft
    assert moe_slim.api.observe is observe and moe_slim.api.sft is sft


def test_readme_recipe_yaml_is_a_valid_recipe():
    (block,) = [b for b in _blocks("yaml") if b.startswith("model:")]
    validate(Recipe, yaml.safe_load(block), "recipe")


def test_readme_python_blocks_run(tmp_path, monkeypatch, one_torch_thread):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    if not (ROOT / "data" / "manifest.json").is_file():
        pytest.fail("the README's examples read the built data: run `make data` first")
    for name in ("models", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    # the first block pruned half the experts in memory; the second wrote a checkpoint with the same plan
    assert namespace["model"].config.num_experts == 16
    assert namespace["steps"]["kept_per_layer"] == namespace["plan"].kept_counts
    assert (tmp_path / "pruned" / "config.json").is_file()
