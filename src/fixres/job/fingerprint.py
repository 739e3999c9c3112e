"""Fingerprints of a run's inputs: a file's content hash, a data index's identity, a settings digest.

A resumable job keys each of its steps on everything that changes the step's result; when a key
differs from the one recorded, the step (and every step downstream) is recomputed and the names
of the changed inputs are reported. Files are hashed by content (a checkpoint replaced under the
same name is noticed); a data index is fingerprinted by (path, size, mtime, label, content sample) of
every image, where the content sample is a hash of the file's first and last ``SAMPLE_BLOCK`` bytes (of
the whole file when it is at most twice that): cheap enough to recompute on every run (two small reads
per photo), and changed by any added, removed, relabelled or edited photo, including one rewritten with
the same size and modification time. An edit confined to the middle of a large file with size and time
kept is the one change it can miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from fixres.data.sources import container_mtime, is_member, read_member

#: Bytes read per chunk while hashing a file (large checkpoints are streamed, never loaded whole).
HASH_CHUNK = 1 << 20
#: Bytes hashed at each end of a photo for the data fingerprint (the whole file when at most twice this).
SAMPLE_BLOCK = 1 << 12


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex); of a folder checkpoint, over its files' names and bytes."""
    if Path(path).is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
            h.update(f.name.encode() + b"\0" + file_digest(f).encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _ends_digest(data: bytes) -> str:
    h = hashlib.sha256()
    h.update(data if len(data) <= 2 * SAMPLE_BLOCK else data[:SAMPLE_BLOCK] + data[-SAMPLE_BLOCK:])
    return h.hexdigest()


def content_sample(path: str | os.PathLike) -> str:
    """sha256 (hex) of a photo's first and last ``SAMPLE_BLOCK`` bytes, of all of it when small; "" if unreadable.
    A photo inside a container (``fixres.data.sources``) is hashed the same way over its own bytes."""
    h = hashlib.sha256()
    try:
        if is_member(os.fspath(path)):  # a shard member or a dataset row: its bytes, read from the container
            return _ends_digest(read_member(os.fspath(path)))
        with open(path, "rb") as f:
            head = f.read(2 * SAMPLE_BLOCK + 1)
            h.update(head[:SAMPLE_BLOCK] if len(head) > 2 * SAMPLE_BLOCK else head)
            if len(head) > 2 * SAMPLE_BLOCK:
                f.seek(-SAMPLE_BLOCK, os.SEEK_END)
                h.update(f.read(SAMPLE_BLOCK))
    except OSError:
        return ""
    return h.hexdigest()


def _photo_facts(path: str | os.PathLike) -> tuple[int, int, str]:
    """(size, mtime_ns, ``content_sample``) of a photo, a container's photo read once for all three; (-1, -1, "")
    when it cannot be read. A container's photo has the container's mtime."""
    ref = os.fspath(path)
    try:
        if is_member(ref):
            data = read_member(ref)
            return len(data), container_mtime(ref), _ends_digest(data)
        st = os.stat(ref)
    except OSError:
        return -1, -1, ""
    return st.st_size, st.st_mtime_ns, content_sample(ref)


def index_fingerprint(samples: Iterable[Sequence]) -> str:
    """sha256 over (path, size, mtime_ns, label, ``content_sample``) of every sample; a missing file counts
    as size -1."""
    h = hashlib.sha256()
    for path, label in samples:
        size, mtime, content = _photo_facts(path)
        h.update(f"{path}\0{size}\0{mtime}\0{label}\0{content}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def digest(obj) -> str:
    """A stable hash of a JSON-able value (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical(value):
    """A value as it reads back from JSON (tuples become lists, paths strings), so keys compare equal."""
    return json.loads(json.dumps(value, default=str))


def changed_keys(old: Mapping | None, new: Mapping) -> list[str]:
    """Names whose values differ between two keys (present in one only counts as changed), sorted."""
    old = old or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def path_digest(path: str | os.PathLike | None) -> str | None:
    """Content hash of a file path (None stays None)."""
    return None if path is None else file_digest(Path(path))
