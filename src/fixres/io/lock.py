"""One writer per output folder: an exclusive, non-blocking lock on ``OUT/.fixres.lock``.

Two runs writing the same ``--out`` would overwrite each other's results and checkpoints, and two
fine-tunes sharing the disk activation cache (``cache/prefix_cache.f16``, a memory map) crash with a
bus error. Every command that writes to ``--out`` takes this lock for its whole run (``fixres.cli.app``);
a second run gets a one-line error naming the folder instead of writing.

``fcntl.flock`` is held by the open file, so the kernel releases it when the process dies (a
SIGKILLed run never leaves a stale lock). A forked child (a DataLoader worker) would share that open
file and keep the lock after its parent is killed, until it notices and exits; so every forked child
closes its copy of the held descriptors at once, and the lock lives exactly as long as its process. The lock file is
removed on release; a run that opened the file just before it was removed sees another inode at the path and retries on
the new file, so two runs can never both hold the lock. Under torchrun the ranks of one job share the folder: only
rank 0 locks it; a second job's rank 0 fails before any of its ranks writes, and torchrun stops the
other ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from fixres.errors import FixresError

LOCK_NAME = ".fixres.lock"
#: Attempts to lock a file that the holder removes between our open and our lock (a release race).
ATTEMPTS = 5


#: Descriptors of the locks this process holds (a forked child closes its copies: ``_drop_in_child``).
_HELD: set[int] = set()


def _drop_in_child() -> None:
    """In a forked child: close the inherited lock descriptors, so no child keeps its parent's lock alive."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class FolderBusy(FixresError):
    """Another fixres run holds the output folder."""


def _try_lock(path: Path) -> int | None:
    """An open fd holding the lock on the file now at ``path``; None when the file was replaced meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the folder was removed by a run releasing it just now
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(f"{path.parent} is in use by another fixres run (it holds {path}); "
                         "wait for it to finish, or choose another --out") from None
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD.add(fd)
    return fd


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, *, lock_path: str | os.PathLike | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (file ``folder/.fixres.lock``, or ``lock_path``) while inside.

    A folder that did not exist and is still empty at the end is removed again, so a run that fails
    before writing anything leaves nothing behind.
    """
    folder = Path(folder)
    path = Path(lock_path) if lock_path is not None else folder / LOCK_NAME
    created = not folder.exists()
    fd = None
    for _ in range(ATTEMPTS):
        fd = _try_lock(path)
        if fd is not None:
            break
    if fd is None:
        raise FolderBusy(f"{folder} is in use by another fixres run (its lock {path} keeps changing)")
    try:
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held: whoever opened it meanwhile sees another inode and retries
        _HELD.discard(fd)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty


def sibling_lock(folder: str | os.PathLike) -> Path:
    """A lock file beside ``folder`` (for a folder that is replaced as a whole, such as a generated data set)."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}{LOCK_NAME}"


def rank_is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain process (torchrun exports RANK; a plain run does not)."""
    return int(os.environ.get("RANK", "0")) == 0
