"""Where a photo's bytes live: a file, a member of a tar shard, or a row of an arrow (Hugging Face) dataset.

Every sample of a ``FolderIndex`` is named by one string, its *reference*, which is what results, skips and
per-photo outcomes show. A file is its path. A member of a WebDataset shard is ``SHARD.tar::MEMBER`` and a row
of a Hugging Face dataset is ``hf:ROOT::SPLIT/COLUMN/ROW``. ``open_photo`` gives the photo as a path or an
in-memory file that PIL opens, so the decode (reduced JPEG decode included) and the counted skips of
``fixres.data.images`` are the same whatever the layout. ``read_member`` and ``container_mtime`` stand for a
photo in a run's fingerprint.

A shard member is read by seeking to its offset: the offsets of a shard are read once per process from its
tar headers (``tar_members``; the indexer's table is inherited by forked loader workers). A dataset row is
read by ``fixres.data.hfsets``, which opens each dataset once per process, memory-mapped.
"""

from __future__ import annotations

import io
import os
import tarfile

from fixres.data.hfsets import HF_PREFIX, read_row

#: Separates a container (a tar shard, an arrow dataset) from the photo inside it in a reference.
MEMBER_SEP = "::"

#: tar path -> {member name: (offset of its data, size)}, filled once per process.
_TAR_MEMBERS: dict[str, dict[str, tuple[int, int]]] = {}


class PhotoUnreadable(OSError):
    """The photo's container or its entry cannot be read; ``str(exc)`` is a short reason."""


def is_member(ref: str) -> bool:
    """True when ``ref`` names a photo inside a container (a shard member, a dataset row), not a file."""
    return MEMBER_SEP in ref and (ref.startswith(HF_PREFIX) or ref.split(MEMBER_SEP, 1)[0].endswith(".tar"))


def member_ref(container: str, member: str) -> str:
    return f"{container}{MEMBER_SEP}{member}"


def row_ref(root: str, split: str, column: str, row: int) -> str:
    return f"{HF_PREFIX}{root}{MEMBER_SEP}{split}/{column}/{row}"


def scan_members(shard: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of the regular files of tar ``shard``, read from its headers now."""
    table = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:  # uncompressed: members are read in place by offset
            for info in tar:
                if info.isfile():
                    table[info.name] = (info.offset_data, info.size)
    except (OSError, tarfile.TarError) as exc:
        raise PhotoUnreadable(f"cannot read shard {shard}: {exc}") from None
    return table


def tar_members(shard: str) -> dict[str, tuple[int, int]]:
    """The offsets of ``shard``'s photos: as its indexer kept them (``keep_members``), else read from its headers."""
    table = _TAR_MEMBERS.get(shard)
    if table is None:
        table = _TAR_MEMBERS[shard] = scan_members(shard)
    return table


def keep_members(shard: str, table: dict[str, tuple[int, int]]) -> None:
    """Keep ``table`` (the photos' offsets, as just indexed) as ``shard``'s: only the photos are read again, and the
    table is copied into every loader worker, so class labels and metadata are left out of it."""
    _TAR_MEMBERS[shard] = table


def read_member(ref: str) -> bytes:
    """The bytes of the photo ``ref`` names inside a container."""
    container, inner = ref.rsplit(MEMBER_SEP, 1)
    if container.startswith(HF_PREFIX):
        split, column, row = inner.rsplit("/", 2)
        data, path = read_row(container[len(HF_PREFIX):], split, column, int(row))
        if data is None and path:
            with open(path, "rb") as f:
                data = f.read()
        if data is None:
            raise PhotoUnreadable("the row has no image")
        return data
    offset, size = _member_entry(container, inner)
    with open(container, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _member_entry(shard: str, member: str) -> tuple[int, int]:
    entry = tar_members(shard).get(member)
    if entry is None:
        raise PhotoUnreadable(f"no member {member} in {shard}")
    return entry


def open_photo(ref: str | os.PathLike) -> str | io.BytesIO:
    """The photo ``ref`` names, as something ``PIL.Image.open`` reads: its path, or its bytes in memory."""
    ref = os.fspath(ref)
    return io.BytesIO(read_member(ref)) if is_member(ref) else ref


def container_mtime(ref: str) -> int:
    """mtime_ns of the file or folder holding the photo ``ref`` names inside it (a shard, a dataset's folder)."""
    container = ref.rsplit(MEMBER_SEP, 1)[0]
    return os.stat(container[len(HF_PREFIX):] if container.startswith(HF_PREFIX) else container).st_mtime_ns
