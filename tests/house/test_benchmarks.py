"""The benchmarks use the public API, or one documented internal.

Every ``benchmarks/*.py`` (but ``_common.py``, their shared module, which documents its own imports) imports at
most one library module beyond ``import fixres`` / ``from fixres import ...`` (the public API), and names that
module in its docstring on a line ``Internal: fixres.x.y`` saying why the public API does not serve. No
benchmark puts tests/ on ``sys.path``: the benchmarks run against the installed package, not the test suite.
Read from the source with ``ast``: nothing is imported or run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

#: The repository root: this file lives in tests/house/.
ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
PACKAGE = ROOT / "src" / "fixres"
SHARED_MODULE = "_common.py"


def _is_module(dotted: str) -> bool:
    """Whether ``fixres.a.b`` names a module or package in src/fixres/ (rather than a name inside one)."""
    path = PACKAGE.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def internal_imports(tree: ast.AST) -> set[str]:
    """The library modules a source imports beyond the public ``fixres``, at any depth (function bodies too).

    ``import fixres.x.y`` and ``from fixres.x.y import name`` name ``fixres.x.y``; ``from fixres.x import y``
    names ``fixres.x.y`` when ``y`` is a module, else ``fixres.x``; ``from fixres import name`` is public unless
    ``name`` is a module (``from fixres import api`` names ``fixres.api``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fixres.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "fixres" and not node.module.startswith("fixres."):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if _is_module(sub):
                    found.add(sub)
                elif node.module != "fixres":
                    found.add(node.module)
    return found


def documented_internals(tree: ast.Module) -> set[str]:
    """The dotted names the module docstring gives on its ``Internal:`` lines."""
    doc = ast.get_docstring(tree) or ""
    return {m.group(1) for m in re.finditer(r"^\s*Internal:\s*(fixres(?:\.\w+)+)", doc, re.M)}


def _mentions_tests(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and re.search(r"(^|[/\\])tests\b", n.value)
               for n in ast.walk(node))


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def _path_of_subscript(node: ast.AST) -> ast.AST:
    return node.value if isinstance(node, ast.Subscript) else node


def puts_tests_on_path(tree: ast.AST) -> list[int]:
    """Lines that add a path naming tests/ to ``sys.path`` (insert / append / extend, ``+=``, assignment) or
    through ``site.addsitedir``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            adds = (_is_sys_path(target) and node.func.attr in ("insert", "append", "extend")) or (
                isinstance(target, ast.Name) and target.id == "site" and node.func.attr == "addsitedir")
            if adds and _mentions_tests(node):
                lines.append(node.lineno)
        elif isinstance(node, ast.AugAssign) and _is_sys_path(node.target) and _mentions_tests(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.Assign) and _mentions_tests(node.value) and any(
                _is_sys_path(_path_of_subscript(t)) for t in node.targets):
            lines.append(node.lineno)
    return lines


def _benchmarks() -> list[Path]:
    return sorted(p for p in BENCHMARKS.glob("*.py") if p.name != SHARED_MODULE)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_checks_catch_what_they_look_for():
    planted = ast.parse('"""Bench.\n\nInternal: fixres.data.loaders - the loader is what it measures.\n"""\n'
                        "import fixres\nfrom fixres import finetune\n"
                        "def f():\n    from fixres.data.loaders import ImageDataset\n"
                        "    from fixres.data import transforms as T\n    import fixres.models.fold\n"
                        "    from fixres import api\n")
    assert internal_imports(planted) == {"fixres.data.loaders", "fixres.data.transforms", "fixres.models.fold",
                                         "fixres.api"}
    assert documented_internals(planted) == {"fixres.data.loaders"}
    assert internal_imports(ast.parse("import fixres\nfrom fixres import sweep, load\n")) == set()
    sneaky = ast.parse("import sys\nfrom pathlib import Path\nROOT = Path(__file__).parent\n"
                       "def f():\n    sys.path.insert(0, str(ROOT / 'tests'))\n"
                       "sys.path += ['../tests/helpers']\nsys.path[:0] = ['tests']\n")
    assert sorted(puts_tests_on_path(sneaky)) == [5, 6, 7]
    assert puts_tests_on_path(ast.parse("import sys\nsys.path.insert(0, 'src')\n")) == []


def test_there_are_benchmarks_to_check():
    assert len(_benchmarks()) >= 5


@pytest.mark.parametrize("path", _benchmarks(), ids=lambda p: p.name)
def test_a_benchmark_uses_the_public_api_or_one_documented_internal(path):
    tree = _tree(path)
    used = internal_imports(tree)
    assert len(used) <= 1, (f"{path.name} imports {len(used)} library internals ({', '.join(sorted(used))}): "
                            "use the public API (import fixres), move a shared need into benchmarks/_common.py, "
                            "or keep the one module it measures")
    missing = used - documented_internals(tree)
    assert not missing, (f"{path.name} imports {', '.join(sorted(missing))} without naming it in its docstring "
                         "on a line 'Internal: fixres.x.y - why the public API does not serve'")


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_no_benchmark_puts_the_tests_on_the_path(path):
    lines = puts_tests_on_path(_tree(path))
    assert not lines, f"{path.name} adds tests/ to sys.path (line {', '.join(map(str, lines))})"
