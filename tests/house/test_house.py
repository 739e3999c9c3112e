"""The house rules that keep the library easy to change, checked on the source itself.

- the rooms (sub-packages) import downward only, in the order ARCHITECTURE.md draws them, and
  ARCHITECTURE.md lists every room and every module exactly as the folders hold them;
- no import cycle among modules, counting the imports hidden under ``if TYPE_CHECKING:``;
- no function over 60 lines and no module over 450;
- fixres modules imported at module level only (a function-level import of a sibling hides a cycle),
  except at the CLI edge, which imports lazily so that ``fixres --help`` never imports torch;
- product words only: no process labels (issue numbers) in the code, the docs or the help texts.
- ruff (configured in pyproject.toml) finds nothing in src, tests and benchmarks.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: The repository root: this file lives in tests/house/.
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = SRC / "fixres"
MAX_FUNCTION_LINES = 60
#: No library module over this many lines: past it a module holds more than one concept.
MAX_MODULE_LINES = 450
#: The rooms from the bottom up: a module may import its own room and the rooms before it, never after.
#: ``core`` is the package's top-level vocabulary (``config``, ``errors``, ``version``).
ROOMS = ("core", "runtime", "io", "data", "models", "choosing", "method", "report", "job", "cli", "api")
#: Top-level modules and the room they belong to.
TOP_LEVEL = {"fixres.config": "core", "fixres.errors": "core", "fixres.version": "core", "fixres.api": "api",
             "fixres": "api", "fixres.__main__": "cli"}
#: Rooms whose functions import lazily on purpose: the CLI edge keeps `fixres --help` free of torch, and the
#: package root exposes the API without importing it.
LAZY_ROOMS = ("cli",)
LAZY_MODULES = ("fixres",)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    return module.split(".")[1]


def _imported(node: ast.AST, known: set[str]) -> set[str]:
    """The fixres modules an import statement names (``from fixres import x`` names ``fixres.x``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = {f"{node.module}.{a.name}" for a in node.names} & known
        return subs or ({node.module} & known)
    return set()


def _module_level_nodes(tree: ast.Module):
    """Every node outside function bodies: top-level statements and what ``if TYPE_CHECKING:`` (or any other
    block at module or class level) holds."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    known = set(modules)
    return {name: set().union(*(_imported(n, known) for n in _module_level_nodes(tree))) - {name}
            for name, tree in modules.items()}


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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a room to a room above it."""
    rank = {room: i for i, room in enumerate(ROOMS)}
    return sorted(f"{a} ({room_of(a)}) imports {b} ({room_of(b)})" for a, targets in graph.items() for b in targets
                  if rank[room_of(b)] > rank[room_of(a)])


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = {"fixres.x": ast.parse("from fixres import y\n"), "fixres.y": ast.parse("import fixres.x\n"),
            "fixres": ast.parse("")}
    assert find_cycle(import_graph(tree)) in (["fixres.x", "fixres.y", "fixres.x"],
                                              ["fixres.y", "fixres.x", "fixres.y"])


def test_a_cycle_hidden_under_type_checking_is_found():
    tree = {"fixres.x": ast.parse("from fixres import y\n"),
            "fixres.y": ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fixres.x import A\n"),
            "fixres": ast.parse("")}
    assert find_cycle(import_graph(tree)) is not None
    lazy = {"fixres.x": ast.parse("from fixres import y\n"),
            "fixres.y": ast.parse("def f():\n    from fixres.x import A\n"), "fixres": ast.parse("")}
    assert find_cycle(import_graph(lazy)) is None  # a function-level import is the next test's business


def test_no_import_cycle_among_library_modules():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_lives_in_a_known_room():
    rooms = {room_of(m) for m in _modules()}
    assert rooms <= set(ROOMS), f"unknown rooms: {sorted(rooms - set(ROOMS))}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(ROOMS) - {"core", "api"}


def test_rooms_import_downward_only():
    graph = import_graph(_modules())
    assert not upward_imports(graph), "imports against the rooms' order:\n" + "\n".join(upward_imports(graph))
    planted = {**graph, "fixres.io.atomic": graph["fixres.io.atomic"] | {"fixres.method.evaluate"}}
    assert upward_imports(planted) == ["fixres.io.atomic (io) imports fixres.method.evaluate (method)"]


def _architecture_table() -> dict[str, set[str]]:
    """ARCHITECTURE.md's room table: ``| `fixres/ROOM/` | `mod`, `mod` | ... |`` -> {room: {modules}}."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`fixres/(\w+)/`\s*\|([^|]*)\|", line)
        if m:
            table[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return table


def test_architecture_lists_every_room_and_module():
    table = _architecture_table()
    actual: dict[str, set[str]] = {}
    for name in _modules():
        parts = name.split(".")
        if len(parts) == 3:
            actual.setdefault(parts[1], set()).add(parts[2])
    assert table == actual, "ARCHITECTURE.md and the folders disagree"


def _functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_functions_fit_on_a_screen(name):
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(_modules()[name])
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{name}: over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_modules_hold_one_concept_each():
    long = {p.relative_to(SRC).as_posix(): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_sibling_modules_are_imported_at_module_level():
    modules = _modules()
    known = set(modules)
    hidden = []
    for name, tree in modules.items():
        if name in LAZY_MODULES or room_of(name) in LAZY_ROOMS:
            continue
        for fn in _functions(tree):
            for node in ast.walk(fn):
                hidden += [f"{name}.{fn.name} imports {m}" for m in sorted(_imported(node, known))]
    assert not hidden, "function-level imports of fixres modules: " + "; ".join(hidden)


#: Words of the development process that must not reach users: issue numbers and item labels.
PROCESS_WORDS = re.compile(r"\bissues? #?\d|(?<![\w.])\(1\d\.\d+\)|\bh-bench\d", re.I)


def _product_files():
    yield from sorted(PACKAGE.rglob("*.py"))
    yield from sorted((ROOT / "benchmarks").glob("*.py"))
    yield from sorted((ROOT / "tests").rglob("*.py"))
    yield from [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_product_words_only():
    found = []
    for path in _product_files():
        if path == Path(__file__):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PROCESS_WORDS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not found, "process labels in product text:\n" + "\n".join(found)
    assert PROCESS_WORDS.search("see issue 16") and PROCESS_WORDS.search("grid (16.5)")
    assert not PROCESS_WORDS.search("section 4.2, table 5 (0.875)")


def _ruff() -> str | None:
    """The ruff next to this interpreter (the project's virtual environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "ruff"
    return str(beside) if beside.is_file() else shutil.which("ruff")


def test_ruff_is_clean():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    folders = ["src", "tests", "benchmarks", "tools"]
    res = subprocess.run([ruff, "check", *folders], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"ruff check {' '.join(folders)} (exit {res.returncode}):\n{res.stdout}{res.stderr}"


#: Lab-notebook words that do not belong in the code, its comments or its help: dates, development rounds and
#: machines, measurement anecdotes (dated records live in docs/results.md).
CODE_LAB_WORDS = re.compile(r"\b(20\d\d-\d\d-\d\d|this round|before this round|dev box|took [\d.]+ ?min)\b", re.I)


def test_no_lab_notebook_in_code_comments_or_help():
    found = []
    for path in [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
                 *sorted((ROOT / "benchmarks").glob("*.py"))]:
        if path == Path(__file__):
            continue
        in_package = PACKAGE in path.parents
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            text = line if in_package else line.split("#", 1)[1] if "#" in line else ""
            if CODE_LAB_WORDS.search(text):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not found, "lab-notebook words in code:\n" + "\n".join(found)
    assert CODE_LAB_WORDS.search("# on the dev box, 2026-12-04") and not CODE_LAB_WORDS.search("# a new head")


#: The README is a user's page: the lab notebook (dates, before/after, "new") lives in docs/results.md.
README_MAX_LINES = 220
LAB_WORDS = re.compile(r"\b(20\d\d-\d\d-\d\d|new|no longer|this round|before this round)\b", re.IGNORECASE)


def test_readme_is_a_users_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move results to docs/results.md"
    lab = [f"{i}: {ln}" for i, ln in enumerate(lines, 1) if LAB_WORDS.search(ln)]
    assert lab == [], "lab-notebook words in README.md:\n" + "\n".join(lab)


def _calls_by_function(tree: ast.Module, prefix: str):
    """(qualified function name, called name) for every call in a module's functions and methods."""
    def visit(node, qual):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from visit(child, f"{qual}.{child.name}")
            elif isinstance(child, ast.Call):
                f = child.func
                owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name:
                    yield qual, name, owner
                yield from visit(child, qual)
            else:
                yield from visit(child, qual)
    yield from visit(tree, prefix)


#: The rooms above the method: the job, the CLI, the report and the API.
UPPER_ROOMS = ("job", "cli", "report", "api")
#: Reading a file back there: a step's JSON document, or any file's text.
FILE_READS = {"read_document", "read_documents", "read_json", "read_text"}
#: Where a step's result is read back from disk: resuming a finished step (and a killed candidate, and
#: state.json itself), restoring a fixed candidate from the select step's folder, and ``fixres report``
#: rebuilding a page from a run folder. Everywhere else results flow forward in memory.
READ_BACK = {"fixres.job.pipeline._execute", "fixres.job.candidates._fix_candidate",
             "fixres.job.candidates.restore_candidate", "fixres.job.runstate.RunState.__init__",
             "fixres.report.page.collect"}


def test_step_results_are_read_back_only_on_resume():
    found = {qual for name, tree in _modules().items() if room_of(name) in UPPER_ROOMS
             for qual, called, _ in _calls_by_function(tree, name) if called in FILE_READS}
    assert found <= READ_BACK, f"files read back outside resume: {sorted(found - READ_BACK)}"
    assert found, "the scan finds no reads at all: it no longer sees the calls"


#: Results are types read once at the boundary (fixres.io.schema.parse); a dict lookup by key is the exception.
MAX_DICT_LOOKUPS = 60
DICT_LOOKUP = '.get("'


def test_results_are_read_as_types_not_dict_lookups():
    counts = {path.relative_to(SRC).as_posix(): path.read_text().count(DICT_LOOKUP) for path in PACKAGE.rglob("*.py")}
    total = sum(counts.values())
    worst = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    assert total < MAX_DICT_LOOKUPS, f"{total} {DICT_LOOKUP} lookups in src (most: {worst})"


#: The one loader (model spec, class names, class-mapped splits) every command and the API go through.
LOADER = "fixres.method.inputs"
#: Loading a model or indexing a folder directly, which the loader owns.
DIRECT_LOADING = {"scan_folder", "index_val_onto", "resolve_split", "load_model"}
#: Modules that load a model or read a data folder.
LOADING_MODULES = ("fixres.cli.eval", "fixres.cli.train", "fixres.cli.stats", "fixres.cli.analyze",
                   "fixres.cli.finetune", "fixres.job.context", "fixres.api")


def test_every_command_loads_through_the_one_loader():
    modules = _modules()
    direct = sorted(f"{qual} calls {called}" for name, tree in modules.items() if room_of(name) in UPPER_ROOMS
                    for qual, called, owner in _calls_by_function(tree, name)
                    if called in DIRECT_LOADING and owner not in ("self", "x"))
    assert direct == [], f"load through {LOADER}: {direct}"
    known = set(modules)
    for name in LOADING_MODULES:
        imported = set().union(*(_imported(n, known) for n in ast.walk(modules[name])))
        assert LOADER in imported, f"{name} does not load through {LOADER}"
