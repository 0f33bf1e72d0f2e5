"""The package's import graph has no cycle, counting the imports inside functions too (they
would hide one). That the recipe schema and the CLI parser import no torch is checked in a fresh
interpreter: tests/integration/test_imports_no_torch.py."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "samed2_kit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _lazy_exports(tree: ast.Module, package: str) -> dict[str, str]:
    """A package's `_WHERE = {name: submodule}` (names it loads on first use)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_WHERE" for t in node.targets
        ):
            return {k: f"{package}.{v}" for k, v in ast.literal_eval(node.value).items()}
    return {}


def import_graph() -> dict[str, set[str]]:
    """module -> the samed2_kit modules it imports (anywhere in the file)."""
    modules = _modules()
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    lazy = {m: _lazy_exports(t, m) for m, t in trees.items() if modules[m].name == "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def target(name: str, attr: str | None) -> str | None:
        if attr and f"{name}.{attr}" in modules:
            return f"{name}.{attr}"
        if attr and attr in lazy.get(name, {}):
            return lazy[name][attr]
        return name if name in modules else None

    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [target(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [target(node.module, a.name) for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in found if t and t.startswith("samed2_kit") and t != mod}
        graph[mod] |= set(lazy.get(mod, {}).values()) - {mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "samed2_kit.model.assemble" in graph and len(graph) > 60
    assert "samed2_kit.registry" in graph["samed2_kit.config"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
