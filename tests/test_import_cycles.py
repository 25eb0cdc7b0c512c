"""No import cycles inside src/moelab, counting imports inside functions too.

Every module under src/moelab is parsed with `ast` (nothing is imported); an edge A -> B is any
``import B`` / ``from B import x`` / ``from . import x`` anywhere in A, at module level or inside a
function, class or ``if`` block. A function-level import hides a cycle from Python's import
machinery but not from a reader, so it counts. The test fails with the cycle spelled out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "moelab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The moelab modules ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule`
        for t in targets:
            # the deepest known module the import names (importing a.b.c also runs a and a.b,
            # but a package's __init__ is not part of the importer's design; count what is named)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith(PACKAGE):
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or ``None`` (iterative DFS, three colours)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop(0)
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from moelab.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from moelab import a\n    return a\n")
    mods = {module_name_in(tmp_path, p): p for p in pkg.glob("*.py")}
    graph = {n: imported(n, p, set(mods)) for n, p in mods.items()}
    assert find_cycle(graph) == ["moelab.a", "moelab.b", "moelab.a"]
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    graph = {n: imported(n, p, set(mods)) for n, p in mods.items()}
    assert find_cycle(graph) is None


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_in_moelab():
    graph = import_graph()
    assert len(graph) > 40 and "moelab.diffusion.unet" in graph
    assert "moelab.diffusion.unet" in graph["moelab.diffusion.baseline"]  # edges are really found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
