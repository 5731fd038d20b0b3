"""The package layout: imports point downward only, no import circles, modules stay small, and the
README's layout section names every part of the tree.

Imports are read from the source (``ast``), including the ones inside functions (moe_slim imports
heavy modules lazily, and a lazy import still ties two modules together); imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "moe_slim"
README = Path(__file__).resolve().parents[1] / "README.md"

#: Each top-level part of the package and its layer; a part imports only from lower layers (or itself).
LAYERS: dict[str, int] = {
    "": 0, "errors": 0,  # the package root (its __init__ imports lazily, by name) and the one exception type
    "outputs": 1, "fingerprint": 1, "prompts": 1,
    "families": 2, "data": 2,
    "modeling": 3, "schema": 3,
    "experts": 4, "evals": 4,
    "recover": 5,
    "checkpoint": 6,
    "api": 7, "dense": 7,
    "sweep": 8, "reference": 8, "recipe": 8,
    "demo": 9,
    "cli": 10,
    "__main__": 11,
}
MAX_LINES = 450  # "no module over ~400 lines": past this, split by idea


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """moe_slim modules that ``path`` imports (submodules resolved when ``from pkg import sub``)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "moe_slim")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "moe_slim":
                return
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) - {name} for name, path in modules.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_part_has_a_layer() -> None:
    parts = {_part(m) for m in _modules()}
    assert parts <= set(LAYERS), f"give these parts a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_imports_point_downward_only() -> None:
    upward = []
    for module, deps in _graph().items():
        for dep in deps:
            a, b = _part(module), _part(dep)
            if a != b and LAYERS[b] >= LAYERS[a]:
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports that do not point downward:\n" + "\n".join(sorted(upward))


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                dfs(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_circles_and_upward_imports(tmp_path: Path) -> None:
    """The two checks above on a made-up package: a lazy upward import and a circle are both caught."""
    pkg = tmp_path / "moe_slim"
    (pkg / "experts").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "experts" / "__init__.py").write_text("")
    (pkg / "experts" / "a.py").write_text("from .b import x\n")
    (pkg / "experts" / "b.py").write_text("def f():\n    from ..api import y\n    from .a import z\n")
    (pkg / "api.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cli import q\n")
    modules = {_module_name_in(tmp_path, p): p for p in pkg.rglob("*.py")}
    deps = {n: _imports(p, n, modules) for n, p in modules.items()}
    assert deps["moe_slim.experts.b"] == {"moe_slim.api", "moe_slim.experts.a"}
    assert deps["moe_slim.experts.a"] == {"moe_slim.experts.b"}
    assert deps["moe_slim.api"] == set()  # annotations only


def _module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines; split it by idea"


def test_readme_layout_names_every_part() -> None:
    text = README.read_text()
    section = text[text.index("## Layout"):]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    parts = {_part(m) for m in _modules()} - {"", "__main__"}
    missing = [p for p in sorted(parts) if not re.search(rf"\b{re.escape(p)}\b", block)]
    assert not missing, f"README's layout section does not mention: {missing}"


def test_readme_python_imports_work() -> None:
    """Every ``from moe_slim... import ...`` line in the README's Python examples imports."""
    import importlib

    text = README.read_text()
    lines = [l for block in re.findall(r"```python\n(.*?)```", text, re.S) for l in block.splitlines()
             if re.match(r"\s*from moe_slim[\w.]* import ", l)]
    assert lines, "the README shows no Python imports"
    for line in lines:
        module, names = re.match(r"\s*from (moe_slim[\w.]*) import (.*)", line).groups()
        mod = importlib.import_module(module)
        for name in (n.strip().split(" as ")[0] for n in names.split(",")):
            assert hasattr(mod, name), f"README: {line.strip()} -> {module} has no {name}"
