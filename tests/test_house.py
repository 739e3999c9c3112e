"""The house rules that keep the library easy to change (issue 13), checked on the source itself:
no import cycle among the library's modules, no library function over 80 lines, and imports of
fixres modules at module level only (a function-level import of a sibling module hides a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fixres"
#: The CLI's argument tables are long by nature; the rule is for the library.
MAX_FUNCTION_LINES = 80
#: Modules whose functions import lazily on purpose: the CLI edge keeps `fixres --help` free of torch,
#: and the package root exposes the API without importing it.
LAZY_MODULES = ("fixres", "fixres.cli", "fixres.__main__")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, known: set[str]) -> set[str]:
    """The fixres modules an import statement names (``from fixres import x`` names ``fixres.x``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = {f"{node.module}.{a.name}" for a in node.names} & known
        return subs or ({node.module} & known)
    return set()


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    known = set(modules)
    return {name: set().union(*(_imported(n, known) for n in tree.body)) - {name} for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None (iterative three-colour DFS)."""
    colour = dict.fromkeys(graph, 0)
    for root in graph:
        if colour[root]:
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = {"fixres.x": ast.parse("from fixres import y\n"), "fixres.y": ast.parse("import fixres.x\n"),
            "fixres": ast.parse("")}
    assert find_cycle(import_graph(tree)) in (["fixres.x", "fixres.y", "fixres.x"], ["fixres.y", "fixres.x", "fixres.y"])


def test_no_import_cycle_among_library_modules():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("name", sorted(m for m in _modules() if ".commands" not in m))
def test_library_functions_fit_on_a_screen(name):
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(_modules()[name])
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{name}: over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_sibling_modules_are_imported_at_module_level():
    modules = _modules()
    known = set(modules)
    hidden = []
    for name, tree in modules.items():
        if name in LAZY_MODULES or ".commands" in name:
            continue
        for fn in _functions(tree):
            for node in ast.walk(fn):
                hidden += [f"{name}.{fn.name} imports {m}" for m in sorted(_imported(node, known))]
    assert not hidden, "function-level imports of fixres modules: " + "; ".join(hidden)
