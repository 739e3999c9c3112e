"""WebDataset shards read as a stream: each shard front to back by one loader worker of one rank, nothing indexed.

``--stream`` (implied by a ``pipe:`` value) evaluates shards without reading their headers first: no list of the
photos is built, so a shard may be a local file or the output of a command that fetches it from object storage
(``pipe:aws s3 cp s3://bucket/val-{000000..000063}.tar -``, braces expanded over the whole value). The shards are
split over ranks, then over each rank's loader workers, shard by shard (``shards_for``); a sample is the
consecutive members sharing a key (``fixres.data.shards``' rule: an image and its ``.cls``), decoded from its
bytes with JPEG's reduced decode as a file is.

Each finished shard reports what it held (``ShardEnd``): the (key, class) of every sample in the order read, the
samples left out, or why the shard could not be read to its end. From those the evaluation checks that every
shard was read exactly once and whole, counts the photos, and puts the per-photo outcomes in the indexed layout's
order (class, then key), so a streamed evaluation's numbers are those of the same shards indexed, whatever the
ranks and workers. Classes in ``.cls`` are numbers (class indices) or, given the class list (``--class-map``, or
an export's own names), class names.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import tarfile
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Callable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from fixres.data.loaders import collate, load_item
from fixres.data.shards import (
    CLASS_SUFFIX,
    expand_braces,
    image_suffix,
    key_of,
    left_out_reason,
    members_by_key,
    resolve_shards,
)
from fixres.data.sources import PhotoUnreadable, member_ref, scan_members
from fixres.errors import UsageError
from fixres.runtime.progress import bar

#: A shard named by the command that writes it to standard output (webdataset's convention).
PIPE_PREFIX = "pipe:"
#: A streamed photo's index is its shard's number times this, plus its place in the shard: unique and ordered.
SHARD_STRIDE = 1 << 32
#: The last lines of a failing command's standard error kept in its one-line error.
STDERR_TAIL = 200


def is_stream(data: str | os.PathLike) -> bool:
    """True when ``data`` names shards written by commands (``pipe:CMD``): they can only be streamed."""
    return os.fspath(data).startswith(PIPE_PREFIX)


@dataclass(frozen=True)
class ShardStream:
    """Shards to stream (paths or ``pipe:`` commands, in order) and the classes their ``.cls`` members name.

    ``classes``: the class names in index order; a ``.cls`` holding a name is looked up in it, a number must be
    below its length. Quacks as much of a ``FolderIndex`` as an evaluation reports (``root``, ``source``,
    ``classes``, ``num_classes``)."""

    spec: str
    shards: tuple[str, ...]
    classes: tuple[str, ...]
    source: str = "class numbers (streamed shards)"
    #: the photos the shards hold, when the user says so (``train --train-count``): no counting pass then
    count: int | None = None

    @property
    def root(self) -> str:
        return self.spec

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @functools.cached_property
    def class_index(self) -> dict[str, int]:
        """{class name: index} of ``classes``."""
        return {name: i for i, name in enumerate(self.classes)}


def open_stream(data: str, *, classes: Sequence[str] | None, num_classes: int, split: str = "val") -> ShardStream:
    """The shards ``data`` names (a ``pipe:`` value, or local shards as ``--data`` names them, their ``split``),
    their classes named by ``classes`` (a class map, an export's names) or numbered up to ``num_classes``."""
    spec = os.fspath(data)
    shards = tuple(expand_braces(spec)) if is_stream(spec) else resolve_shards(spec, split).shards
    if classes is not None:
        return ShardStream(spec, shards, tuple(classes), "class map (streamed shards)")
    return ShardStream(spec, shards, tuple(str(k) for k in range(num_classes)))


def shards_for(n_shards: int, rank: int, world_size: int, worker: int, workers: int) -> list[int]:
    """The shards one loader worker of one rank reads: every shard by exactly one worker of one rank."""
    return list(range(n_shards))[rank::world_size][worker::workers]


@dataclass(frozen=True)
class ShardEnd:
    """What one shard held, as read: (key, class) per sample in order, (reference, reason) per sample left out, and
    why it could not be read to its end (None when it was)."""

    shard: int
    entries: tuple[tuple[str, int], ...]
    left: tuple[tuple[str, str], ...] = ()
    error: str | None = None


class ShardError(Exception):
    """A shard that cannot be read to its end, or holds a class outside the class list."""


#: What reading a shard to its end may raise: its own failures, and the file's or the archive's.
SHARD_READ_ERRORS = (ShardError, OSError, tarfile.TarError, EOFError)


@contextlib.contextmanager
def opened(shard: str) -> Iterator[BinaryIO]:
    """The bytes of ``shard``: the file, or a ``pipe:`` command's standard output (its exit status checked)."""
    if not is_stream(shard):
        try:
            with open(shard, "rb") as f:
                yield f
        except OSError as exc:
            raise ShardError(f"cannot read shard {shard}: {exc.strerror or exc}") from None
        return
    proc = subprocess.Popen(shard[len(PIPE_PREFIX):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    unread = None
    try:
        yield proc.stdout
        proc.stdout.read()  # what follows the archive's end, so the command is never stopped by a closed pipe
    except (OSError, tarfile.TarError, EOFError) as exc:
        unread = exc  # said below, unless the command's own failure explains it
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode("utf-8", "replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        tail = err.splitlines()[-1][:STDERR_TAIL] if err else "no message"
        raise ShardError(f"{shard}: the command exited with status {code} ({tail})")
    if unread is not None:
        raise unread


class _Counted:
    """A stream that counts the bytes read from it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.n = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.n += len(data)
        return data


def samples_in(stream: BinaryIO) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """(key, {lower-case suffix: (member name, bytes)}) of each run of consecutive members sharing a key, read
    front to back; ``ShardError`` when the archive stops without its end marker (a shard cut short between
    members reads as a shorter archive otherwise)."""
    counted = _Counted(stream)
    key, parts = None, {}
    with tarfile.open(fileobj=counted, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, suffix = key_of(info.name)
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            parts[suffix.lower()] = (info.name, tar.extractfile(info).read())
        counted.read()
        if counted.n < tar.offset + tarfile.BLOCKSIZE:
            raise ShardError("the archive ends without its end marker (cut short?)")
    if key is not None:
        yield key, parts


@dataclass(frozen=True)
class Photo:
    """One sample of a streamed shard: its key, the reference naming it, and its image's bytes and class; or, for a
    sample left out (no image, or no class), ``data`` None and the ``reason``."""

    key: str
    ref: str
    data: bytes | None = None
    label: int = -1
    reason: str | None = None


def class_of(text: str, stream: ShardStream) -> int:
    """The class index a ``.cls`` member's text names in ``stream`` (a number, or one of its class names)."""
    at = stream.class_index
    label = int(text) if text.isdigit() else at.get(text)
    if label is None:
        raise ShardError(f"class {text!r} is not one of the {len(at)} classes"
                         + ("" if stream.source.startswith("class map") else
                            "; .cls holding class names needs their order: --class-map FILE"))
    if label >= len(at):
        raise ShardError(f"class {label} is outside the model's {len(at)} classes")
    return label


def labelled_photos(shard: str, stream: ShardStream) -> Iterator[Photo]:
    """Every sample of ``shard``, front to back, as a ``Photo`` (``ShardError``: the shard ends early, or a class is
    not one of ``stream``'s)."""
    with opened(shard) as f:
        for key, parts in samples_in(f):
            reason = left_out_reason(parts)
            if reason is not None:
                yield Photo(key, member_ref(shard, key), reason=reason)
                continue
            label = class_of(parts[CLASS_SUFFIX][1].decode("utf-8", "replace").strip(), stream)
            name, data = parts[image_suffix(parts)]
            yield Photo(key, member_ref(shard, name), data, label)


def count_photos(shard: str) -> int:
    """The samples of ``shard`` with an image and a class: from the tar headers of a local file, from the bytes of
    a ``pipe:`` command's output."""
    if is_stream(shard):
        with opened(shard) as f:
            return sum(1 for _, parts in samples_in(f) if left_out_reason(parts) is None)
    try:
        names = scan_members(shard)
    except PhotoUnreadable as exc:
        raise ShardError(str(exc)) from None
    return sum(1 for parts in members_by_key(names).values() if left_out_reason(parts) is None)


def shard_counts(stream: ShardStream, shards: Sequence[str], *, progress: bool,
                 desc: str = "counting the photos") -> list[int]:
    """``count_photos`` of each of ``shards`` (of ``stream``), a bar of the shards counted with ``progress`` (for a
    ``pipe:`` value, a whole read); one line when one cannot be counted."""
    counting = bar(len(shards), desc, enabled=progress, unit="shard")
    counts: list[int] = []
    try:
        for shard in shards:
            counts.append(count_photos(shard))
            counting.update()
    except SHARD_READ_ERRORS as exc:
        raise UsageError(f"cannot count the photos of {stream.spec}: {exc}") from None
    finally:
        counting.close()
    return counts


def shard_failure(shard: str, exc: BaseException) -> str:
    """The one line saying why ``shard`` could not be read to its end (``exc``: a ``ShardError`` or a read error)."""
    said = str(exc)
    if isinstance(exc, ShardError):
        return said if shard in said else f"shard {shard}: {said}"
    return f"cannot read shard {shard} to its end: {said}"


class StreamedShards(IterableDataset):
    """The samples of ``stream``'s shards that this rank and loader worker read, each as ``load_item`` gives it,
    each shard followed by its ``ShardEnd``; ``keep(index)`` False: the photo is read past, not decoded.

    ``batch_size``: whole batches instead (``stream_collate``'s), none spanning two shards, each shard's last one
    carrying its ``ShardEnd``: the same batches whatever the loader workers (load it with ``batch_size=None``)."""

    def __init__(self, stream: ShardStream, transform: Callable, *, rank: int, world_size: int,
                 reduced_decode: bool = True, keep: Callable[[int], bool] | None = None,
                 batch_size: int | None = None) -> None:
        self.stream, self.transform, self.reduced_decode = stream, transform, reduced_decode
        self.rank, self.world_size, self.keep, self.batch_size = rank, world_size, keep, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in shards_for(len(self.stream.shards), self.rank, self.world_size, worker, workers):
            yield from (self._shard(s) if self.batch_size is None else self._batches(s))

    def _batches(self, s: int):
        items: list = []
        for item in self._shard(s):
            items.append(item)
            if isinstance(item, ShardEnd) or len(items) == self.batch_size:
                yield stream_collate(items)
                items = []

    def _shard(self, s: int):
        shard = self.stream.shards[s]
        entries: list[tuple[str, int]] = []
        left: list[tuple[str, str]] = []
        try:
            for photo in labelled_photos(shard, self.stream):
                if photo.data is None:
                    left.append((photo.ref, photo.reason))
                    continue
                i = s * SHARD_STRIDE + len(entries)
                entries.append((photo.key, photo.label))
                if self.keep is not None and not self.keep(i):
                    continue
                yield load_item(photo.data, photo.ref, photo.label, i, self.transform,
                                reduced_decode=self.reduced_decode)
        except SHARD_READ_ERRORS as exc:
            yield ShardEnd(s, tuple(entries), tuple(left), shard_failure(shard, exc))
            return
        yield ShardEnd(s, tuple(entries), tuple(left))


def stream_collate(items: list):
    """``loaders.collate`` of the photos, each finished shard's ``ShardEnd`` kept beside them (``Batch.ends``)."""
    ends = [it for it in items if isinstance(it, ShardEnd)]
    return replace(collate([it for it in items if not isinstance(it, ShardEnd)]), ends=ends)


class ShardReading:
    """A loader's batches of ``StreamedShards``, as they come, each finished shard's record set aside (``ends``)."""

    def __init__(self, loader) -> None:
        self.loader, self.ends = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.ends.extend(batch.ends)
            yield batch


@dataclass
class StreamOrder:
    """Every shard's ``ShardEnd`` (all ranks), checked whole, and the indexed layout's order of the photos read."""

    stream: ShardStream
    ends: list[ShardEnd] = field(default_factory=list)

    def check(self) -> None:
        """One line when a shard failed, or was read twice or not at all (every shard is read exactly once)."""
        failed = sorted((e for e in self.ends if e.error), key=lambda e: e.shard)
        if failed:
            raise UsageError(failed[0].error)
        seen = sorted(e.shard for e in self.ends)
        if seen != list(range(len(self.stream.shards))):
            raise UsageError(f"internal error: shards read {seen}, expected each of {len(self.stream.shards)} once")

    @property
    def total(self) -> int:
        return sum(len(e.entries) for e in self.ends)

    @property
    def left(self) -> list[tuple[str, str]]:
        return [x for e in sorted(self.ends, key=lambda e: e.shard) for x in e.left]

    def positions(self) -> dict[int, int]:
        """{streamed index: place in (class, key) order}, the order the same shards indexed give their photos."""
        read = [(label, key, e.shard * SHARD_STRIDE + pos) for e in self.ends
                for pos, (key, label) in enumerate(e.entries)]
        return {i: place for place, (_, _, i) in enumerate(sorted(read))}

