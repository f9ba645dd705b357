"""maisicore's modules import each other without a circle: the import graph of the package, built from
the source (imports at any scope: module level and inside functions), is acyclic. Two files that
import each other share a rule that sits in the wrong one of them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "MAISICore" / "maisicore"


def _module_names(root: Path) -> dict[str, Path]:
    """{"maisicore.io.volumes": path, "maisicore.io": path of its __init__.py, ...}."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from .{level}name import ...`` written in ``module``."""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, relative imports resolved. ``from X import y`` imports
    the module X.y when there is one, else X; importing a submodule does not count its parent packages'
    ``__init__`` (Python runs them first, whoever imports)."""
    modules = _module_names(root)
    package = root.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module) if node.level else node.module
                # `from P import m`: the module P.m when there is one (P's __init__ runs first, as for
                # every submodule: not counted), else the name m of module P
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                if target and (target == package or target.startswith(package + ".")) and target in modules:
                    if target != name:
                        graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "maisicore.cli.common" in graph["maisicore.cli"]  # from .common import ...
    assert "maisicore.errors" in graph["maisicore.cli.common"]  # from ..errors import ...
    assert "maisicore.pipelines.safety" in graph["maisicore.cli.common"]  # inside a function
    assert "maisicore.cli.generate" in graph["maisicore.cli"]  # from . import generate
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_maisicore_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


if __name__ == "__main__":
    graph = import_graph()
    while (cycle := find_cycle(graph)) is not None:
        print(" -> ".join(cycle))
        graph[cycle[-2]].discard(cycle[-1])
