"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A reader (or a resumed run) therefore sees either the old complete file or the new complete file,
never a half-written one under the final name, even after SIGKILL.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fixres.errors import FixresError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would have given it,
        # or keep the mode of the file it replaces.
        os.chmod(tmp_path, _target_mode(path))
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    # surrogateescape: file and folder names that are not valid UTF-8 are written back as their bytes
    write_bytes(path, text.encode("utf-8", errors="surrogateescape"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON; NaN/Infinity are refused (they are not JSON) with a one-line FixresError."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError:
        raise FixresError(f"refusing to write {path}: it holds NaN or infinity, which JSON cannot store") from None
    write_text(path, text + "\n")


def plain_json(obj: Any) -> Any:
    """``obj`` as plain JSON values (numpy scalars and arrays, tuples and paths converted), as ``write_json``
    would store it; NaN/Infinity are refused with a one-line FixresError."""
    try:
        return json.loads(json.dumps(obj, default=_json_default, allow_nan=False))
    except ValueError:
        raise FixresError("refusing NaN or infinity: JSON cannot store it") from None


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and Paths appear in results; make them plain JSON.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync (a log: a torn last line is tolerated by ``read_jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return records
