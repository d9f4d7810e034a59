"""The modules form layers: each imports only modules below it, so the way of a task (and of a
map's input) goes down only. ``_map`` sits under ``_pool`` and knows the pool as a protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import cleanbreak

PACKAGE = Path(cleanbreak.__file__).parent


def _imports(path: Path) -> set[str]:
    """The cleanbreak modules a module imports, at run time or for type checking alike."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module)
            else:
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cleanbreak."):
            out.add((node.module or "").split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cleanbreak."))
    return out


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_map_sits_under_pool() -> None:
    graph = _graph()
    assert "_map" in graph["_pool"]
    assert "_pool" not in graph["_map"]
