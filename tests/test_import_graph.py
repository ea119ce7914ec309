"""No import circle among the modules of lanterna, lazy imports included.

Every module of src/lanterna is parsed with :mod:`ast` (nothing is imported) and every import of a lanterna
module becomes an edge: top-level imports and those inside functions and methods alike (a lazy import hides a
circle from the interpreter, not from the reader). ``from . import x`` and ``from ..io import y`` are resolved
against the importing module's package. ``from pkg import name`` is an edge to ``pkg.name`` where that is a
module, else to ``pkg`` (its ``__init__``), whose own imports are then its edges: importing
``lanterna.callbacks`` for ``ModelCheckpoint`` is an edge to ``lanterna.callbacks`` and from there to its
submodules. ``from pkg.mod import name`` is an edge to ``pkg.mod`` only: the parent packages Python runs first
are not counted. Imports under ``if TYPE_CHECKING:`` are excluded: they never run.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

Edges = dict[str, dict[str, str]]  # module -> {imported module: "file:line" of the first such import}


def module_files(src: Path, package: str) -> dict[str, Path]:
    """``{import name: file}`` for every module of ``src/package`` (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda node: node.lineno)


def import_graph(src: Path, package: str) -> Edges:
    """The import graph of the modules of ``src/package`` (only edges between them)."""
    files = module_files(src, package)
    graph: Edges = {name: {} for name in files}

    def add(name: str, target: str, where: str) -> None:
        if target in files and target != name:
            graph[name].setdefault(target, where)

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            where = f"{path.relative_to(src)}:{node.lineno}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        add(name, alias.name, where)
                continue
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != package:
                continue
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                add(name, submodule if submodule in files else origin, where)
    return graph


def strongly_connected(graph: Edges) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def shortest_cycle(graph: Edges, start: str, members: set[str]) -> list[str]:
    """The shortest chain ``start -> ... -> start`` inside ``members`` (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return []


def cycles(graph: Edges) -> list[list[str]]:
    """One shortest cycle through each module that is on a cycle, duplicates (rotations) removed."""
    found: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for component in strongly_connected(graph):
        for start in component:
            chain = shortest_cycle(graph, start, set(component))
            ring = chain[:-1]
            key = tuple(sorted(ring))
            if chain and key not in seen:
                seen.add(key)
                found.append(chain)
    return found


def describe(graph: Edges, chain: list[str]) -> str:
    """``a -> b (a.py:3) -> a (b.py:9)``."""
    return chain[0] + "".join(f"\n    -> {b}  ({graph[a][b]})" for a, b in zip(chain, chain[1:]))


# ---------------------------------------------------------------------------- the checker, on a known package


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_graph_reads_every_kind_of_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from . import sub\nfrom .top import f\n",
        "pkg/top.py": "def f():\n    from .sub import leaf\n    from .sub.leaf import g\n",
        "pkg/sub/__init__.py": "from .leaf import g\n",
        "pkg/sub/leaf.py": (
            "from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    from ..top import f\n"
            "else:\n    import pkg.other\nclass C:\n    def m(self):\n        from .. import VERSION\n"
        ),
        "pkg/other.py": "from pkg.sub import g\nfrom pkg import top\nimport torch\n",
    })
    graph = {k: set(v) for k, v in import_graph(tmp_path, "pkg").items()}
    assert graph == {
        "pkg": {"pkg.sub", "pkg.top"},
        "pkg.top": {"pkg.sub.leaf"},  # `from .sub import leaf`: the module leaf, not the package sub
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.other", "pkg"},  # not pkg.top: that import is under TYPE_CHECKING
        "pkg.other": {"pkg.sub", "pkg.top"},
    }
    found = cycles(import_graph(tmp_path, "pkg"))
    assert [c[0] == c[-1] for c in found] == [True] * 3
    assert {frozenset(c) for c in found} == {frozenset({"pkg", "pkg.sub", "pkg.sub.leaf"}),
                                             frozenset({"pkg.other", "pkg.sub", "pkg.sub.leaf"}),
                                             frozenset({"pkg.top", "pkg.sub.leaf", "pkg"})}
    assert describe(import_graph(tmp_path, "pkg"), ["pkg", "pkg.top", "pkg.sub.leaf", "pkg"]) == (
        "pkg\n    -> pkg.top  (pkg/__init__.py:2)\n    -> pkg.sub.leaf  (pkg/top.py:2)"
        "\n    -> pkg  (pkg/sub/leaf.py:9)")


def test_graph_without_cycle_reports_none(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "from .a import x\n", "pkg/a.py": "def x():\n    from . import b\n",
                      "pkg/b.py": "import os\n"})
    assert cycles(import_graph(tmp_path, "pkg")) == []


# ---------------------------------------------------------------------------- lanterna


def test_core_is_a_package():
    assert (SRC / "lanterna" / "core" / "__init__.py").is_file()


def test_no_import_cycle_in_lanterna():
    graph = import_graph(SRC, "lanterna")
    assert len(graph) > 30 and "lanterna.core.loop" in graph["lanterna.api"]  # the graph was read
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s), lazy imports included:\n" + "\n".join(
        describe(graph, chain) for chain in found)


def test_io_imports_nothing_above_it():
    """lanterna.io is below the rest: saving a model needs only errors (and the version string)."""
    graph = import_graph(SRC, "lanterna")
    allowed = {"lanterna.errors", "lanterna._version"}
    above = {f"{name} -> {target} ({where})" for name, targets in graph.items() if name.startswith("lanterna.io")
             for target, where in targets.items() if not target.startswith("lanterna.io") and target not in allowed}
    assert not above, sorted(above)
