"""The package's layers: imports point down the layers only, and no modules import each other in a circle.

Every import counts, module-level, inside functions or under ``TYPE_CHECKING``: a lazy import is still a
dependency. The layers, lowest first, are those of the map in ``nasloc/__init__.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nasloc"
LAYERS = [  # lowest first; a module may import its own layer and the layers below it
    ("nasloc.errors", "nasloc.units", "nasloc.fileio", "nasloc.console"),
    ("nasloc.arch", "nasloc.arch_view"),
    ("nasloc.space",),
    ("nasloc.models",),
    ("nasloc.run",),
    ("nasloc.storage",),
    ("nasloc.training",),
    ("nasloc.supernet",),
    ("nasloc.search",),
    ("nasloc.deploy",),
    ("nasloc.selection",),
    ("nasloc.report",),
    ("nasloc.phases",),
    ("nasloc.pipeline",),
    ("nasloc.cli",),
]
TOP = ("nasloc", "nasloc.__main__")  # the package's face and ``python -m nasloc`` may import anything


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imports(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every nasloc module that module ``name`` (with ``source``) imports, anywhere in it. ``from pkg import mod``
    imports ``pkg.mod``; ``pkg`` counts only when a name that is not a module is taken from it."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES
            found |= submodules or {base}
    return {m for m in found if m in MODULES} - {name}


def layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise LookupError(module)


GRAPH = {module_name(p): imports(p.read_text(), module_name(p), p.name == "__init__.py")
         for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in GRAPH:
        try:
            layer(module)
        except LookupError:
            unplaced.append(module)
    assert set(unplaced) <= set(TOP), f"add to LAYERS (and to the map in nasloc/__init__.py): {unplaced}"


@pytest.mark.parametrize("module", sorted(set(GRAPH) - set(TOP)))
def test_imports_point_down_the_layers(module: str) -> None:
    upward = sorted(m for m in GRAPH[module] if m not in TOP and layer(m) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: {upward}"


def test_no_import_circles() -> None:
    """Tarjan's strongly connected components of the import graph: every one a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in GRAPH.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_the_layer_test_sees_lazy_and_type_checking_imports() -> None:
    """The test itself: an import inside a function or under TYPE_CHECKING, from a low layer to a high one."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..report.summary import write_summary\n"
              "def late():\n    from ..pipeline import run_pipeline\n    from .. import pipeline\n")
    found = imports(source, "nasloc.space.flops")
    assert found == {"nasloc.report.summary", "nasloc.pipeline"}
    assert all(layer(m) > layer("nasloc.space.flops") for m in found)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_short(path: Path) -> None:
    assert len(path.read_text().splitlines()) < 480, "split it by job"
