"""Mutation check (issue 17): plant small, plausible one-line bugs, one at a time, and run the tests that
claim to guard that code. A mutant that no test notices ("survived") marks a gap in the suite.

Each mutant names a file, an exact snippet that must occur exactly once in it, its replacement, and the
test selection to run. The tree is copied once into a temporary folder (tracked and untracked files,
not the virtual environment); each mutant is applied to a fresh copy of its one file there, and pytest
runs with that copy's ``src`` first on ``sys.path`` (subprocesses inherit it through PYTHONPATH), so the
working tree is never touched. A snippet that no longer matches the code is reported as "stale", and
counts as a failure of this check: the list must follow the code.

    .venv/bin/python benchmarks/mutation_check.py [--only NAME ...] [--list]

Exit status 0 when every mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import REPO

#: Wall-clock limit of one mutant's test run (a mutant that hangs the suite counts as killed by timeout).
MUTANT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    path: str  # relative to the repository root
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str


MUTANTS: tuple[Mutant, ...] = ()  # filled below, next to the code they mutate


def _register(*mutants: Mutant) -> None:
    global MUTANTS
    MUTANTS = MUTANTS + mutants


def copy_tree(dest: Path) -> Path:
    """Tracked and untracked (not ignored) files of the repository, as CI's clean clone would hold them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def run_mutant(m: Mutant, tree: Path) -> dict:
    target = tree / m.path
    original = target.read_text(encoding="utf-8")
    count = original.count(m.find)
    if count != 1:
        return {"name": m.name, "status": "stale", "detail": f"snippet found {count} times in {m.path}"}
    target.write_text(original.replace(m.find, m.replace), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=MUTANT_TIMEOUT_S)
        status = "survived" if res.returncode == 0 else ("killed" if res.returncode == 1 else f"error rc={res.returncode}")
        tail = (res.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        status, tail = "killed", f"timeout after {MUTANT_TIMEOUT_S} s"
    finally:
        target.write_text(original, encoding="utf-8")
    return {"name": m.name, "status": status, "detail": tail, "seconds": round(time.perf_counter() - t0, 1)}


def baseline(tree: Path, tests: list[str]) -> bool:
    """The selected tests must pass on the unmutated copy, or a 'kill' would mean nothing."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-3000:], file=sys.stderr)
    return res.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="run only these mutants (by name)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated tree")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.area:14s} {m.path}: {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fixres-mutants-") as tmp:
        tree = copy_tree(Path(tmp))
        all_tests = sorted({t for m in chosen for t in m.tests})
        if not args.no_baseline and not baseline(tree, all_tests):
            print("the selected tests fail on the unmutated tree: fix that first", file=sys.stderr)
            return 2
        rows = []
        for m in chosen:
            row = run_mutant(m, tree)
            rows.append(row)
            print(f"{row['status']:9s} {m.name:28s} {m.area:14s} {row.get('seconds', 0):6.1f} s  {row['detail']}",
                  flush=True)
    killed = sum(r["status"] == "killed" for r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed; survived or stale: "
          f"{', '.join(r['name'] for r in rows if r['status'] != 'killed') or 'none'}")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
