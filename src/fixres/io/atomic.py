"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A reader (or a resumed run) therefore sees either the old complete file or the new complete file,
never a half-written one under the final name, even after SIGKILL. A set of files that belong together
(an export) is written to a staging folder and published by renames (``swap_in``); a command's result
files are all its own or, when it fails, all as they were (``all_or_none``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def _nulls_for_nonfinite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls_for_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls_for_nonfinite(v) for v in value]
    return value


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync (a log: a torn last line is tolerated by ``read_jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A log line stays JSON: a NaN or infinite number (a diverging loss) is written as null, not as NaN.
    line = json.dumps(_nulls_for_nonfinite(json.loads(json.dumps(record, default=_json_default))), allow_nan=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
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


#: Prefix of the hidden folders that hold a command's previous result files while it runs.
BEFORE_PREFIX = ".fixres.before-"


def swap_in(staging: str | os.PathLike, folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Publish the files ``names`` of ``staging`` in ``folder`` as one set, replacing those of the same names.

    The old files are renamed aside first, then the new ones renamed in, then the old ones removed; a name
    absent from ``staging`` is absent afterwards. Every step is a rename within one file system, so nothing
    here needs free space; if a rename fails anyway, the old set is put back and the error raised.
    """
    staging, folder = Path(staging), Path(folder)
    aside = Path(tempfile.mkdtemp(prefix=".fixres.aside-", dir=folder))
    old_moved: list[str] = []
    new_moved: list[str] = []
    try:
        for name in names:
            if os.path.lexists(folder / name):
                os.replace(folder / name, aside / name)
                old_moved.append(name)
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, folder / name)
                new_moved.append(name)
    except OSError:
        for name in new_moved:
            os.replace(folder / name, staging / name)
        for name in old_moved:
            os.replace(aside / name, folder / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(folder)


def remove_stale_folders(folder: str | os.PathLike, prefixes: Sequence[str]) -> None:
    """Remove hidden work folders (``prefixes``) a killed run left in ``folder``: they hold copies, never results."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and entry.name.startswith(tuple(prefixes)):
            shutil.rmtree(entry.path, ignore_errors=True)


@contextmanager
def all_or_none(folder: str | os.PathLike, names: Sequence[str]) -> Iterator[None]:
    """A command's result files ``names`` in ``folder``: all of this run's, or, when it fails, all as before.

    The files present at the start are hard-linked aside (no copy: every writer here replaces a file by
    renaming, so a link keeps the old bytes). If the body raises, each name gets its old file back, and a
    name that did not exist before is removed; on success the links are dropped.
    """
    folder = Path(folder)
    remove_stale_folders(folder, (BEFORE_PREFIX, ".fixres.aside-"))
    present = [n for n in names if (folder / n).is_file()]
    backup = Path(tempfile.mkdtemp(prefix=BEFORE_PREFIX, dir=folder)) if present else None
    for name in present:
        try:
            os.link(folder / name, backup / name)
        except OSError:  # a file system without hard links: a copy
            shutil.copy2(folder / name, backup / name)
    try:
        yield
    except BaseException:
        for name in names:
            if backup is not None and (backup / name).exists():
                os.replace(backup / name, folder / name)
            else:
                with contextlib.suppress(OSError):
                    (folder / name).unlink()
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
