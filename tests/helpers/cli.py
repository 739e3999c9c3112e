"""Running the CLI in-process and as a subprocess, the flags of a valid command, one-line error checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: The virtual environment's programs (fixres, torchrun): those beside the interpreter running the tests.
VENV_BIN = Path(sys.executable).parent
FIXRES = VENV_BIN / "fixres"

#: (command, flags that make a valid invocation of each command taking a model and data, apart from the model,
#: --data and --out)
MODEL_COMMANDS = {
    "eval": ["--test-size", "32"],
    "sweep": ["--test-sizes", "32,48"],
    "finetune": ["--test-size", "32", "--epochs", "1"],
    "train": ["--train-size", "32", "--epochs", "1"],
    "stats": ["--sizes", "32,48"],
    "adapt": ["--method", "bn-recalibrate", "--test-size", "48"],
    "fix": ["--test-size", "32", "--epochs", "1"],
}


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``fixres ARGV`` in this process; returns (exit code, stdout, stderr)."""
    from fixres.cli.app import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fixres_subprocess(*argv, timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(FIXRES), *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd)


def assert_one_line_error(err: str, *phrases: str) -> None:
    """A usage/runtime error: one line on stderr (the last; progress lines may precede it), no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [i for i, ln in enumerate(lines) if ln.startswith("fixres") and "error:" in ln]
    assert len(errors) == 1, f"expected one error line, got:\n{err}"
    assert errors[0] == len(lines) - 1, f"the error message continues on more lines:\n{err}"
    line = lines[-1]
    for phrase in phrases:
        assert phrase.lower() in line.lower(), f"{phrase!r} not in {line!r}"
