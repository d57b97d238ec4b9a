"""The package's layout rules that import-linter's contracts do not cover: no import cycle between any
two modules (imports inside functions included) and no `_private` name imported from another module."""

from __future__ import annotations

import re
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules_lazy_imports_included():
    graph = grimp.build_graph("artscale")
    assert len(graph.modules) > 40
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_private_name_is_imported_from_another_module():
    pattern = re.compile(r"from artscale[\w.]* import \(?([^)]*?)\)?$", re.M | re.S)
    bad = []
    for path in sorted([*ROOT.glob("artscale/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]):
        for statement in re.findall(r"^\s*from artscale[\w.]* import (?:\([^)]*\)|[^\n]*)", path.read_text(), re.M):
            names = pattern.search(statement.strip()).group(1)
            for name in re.split(r"[,\s]+", names):
                if name.startswith("_") and name != "__version__":
                    bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert bad == []
