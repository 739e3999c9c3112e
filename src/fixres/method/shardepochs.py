"""Training epochs over streamed shards: one rank's photos in an order that the seed alone decides.

``fixres train --stream`` (implied by a ``pipe:`` value) reads its training shards front to back, as a streamed
evaluation does: no list of the photos is built, only one count per shard. An epoch (``ShardEpochs``):

* the shards in an order drawn from (seed, epoch), dealt to the ranks in turn (rank r reads shards r, r + W, ...);
* each rank reads its shards' bytes in the training process itself (no decode there; in a thread, ``read_ahead``,
  so the reading overlaps the training steps), through a shuffle buffer of
  ``buffer`` photos drawn from (seed, epoch, rank), each photo repeated ``repeats`` times consecutively (repeated
  augmentation, as one process of the indexed sampler repeats it), until it has the indexed sampler's count,
  ``ceil(len_factor * n / world_size)``; a rank whose shards run out reads them again from the first;
* the photos travel to the loader workers as the sampler's keys (bytes, class, reference, position), so decoding
  and augmenting run in the workers, and each photo's augmentation is seeded from (seed, epoch, position)
  (``sampler.SeededSamples``).

The order depends on nothing else: the same weights with 0, 1 or 8 loader workers, and a run resumed at an epoch's
end continues the same run. ``n`` comes from a first pass counting the photos (``streams.count_photos``: the tar
headers of local shards, the bytes of a ``pipe:`` command's), summed over the ranks, or from the user
(``ShardStream.count``: ``--train-count``), which spares a ``pipe:`` value that extra download.
"""

from __future__ import annotations

import math
import queue
import random
import threading
from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from fixres.data.loaders import ImageDataset, load_item
from fixres.data.streams import SHARD_READ_ERRORS, ShardStream, labelled_photos, shard_counts, shard_failure
from fixres.errors import UsageError
from fixres.method.sampler import RepeatedAugSampler, SeededSamples, epoch_seed
from fixres.runtime import dist

#: Photos held in a rank's shuffle buffer (their encoded bytes: about 110 kB each for ImageNet's JPEGs).
DEFAULT_SHUFFLE_BUFFER = 1000
#: Photos the reading thread holds ready ahead of the loader's requests.
READ_AHEAD = 256
#: Seconds between the reading thread's checks that its reader has stopped asking.
_POLL_S = 0.1


def count_stream(stream: ShardStream, env: dist.DistEnv, *, progress: bool = False) -> int:
    """The photos of ``stream``'s shards (its ``count`` when given), each rank counting every W-th shard (a bar of
    the shards counted with ``progress``: for a ``pipe:`` value, a whole read)."""
    if stream.count is not None:
        return stream.count
    mine = shard_counts(stream, stream.shards[env.rank::env.world_size], progress=progress and env.is_main,
                        desc="counting the photos (--train-count N spares it)")
    return dist.all_reduce_sum_int(sum(mine), env)


class ShardEpochs(Sampler):
    """One rank's keys ``((bytes, class, reference, position), position, epoch)`` for one epoch of ``stream``
    (the module's order); ``n``: the photos the shards hold. Call ``set_epoch(e)`` before iterating."""

    def __init__(self, stream: ShardStream, n: int, *, repeats: int, rank: int, world_size: int, seed: int,
                 len_factor: float, buffer: int = DEFAULT_SHUFFLE_BUFFER) -> None:
        if n <= 0:
            raise UsageError(f"{stream.spec}: the shards hold no photo with a class")
        if len(stream.shards) < world_size:
            raise UsageError(f"{stream.spec}: {len(stream.shards)} shard(s) for {world_size} processes; streamed "
                             "training reads whole shards, at least one per process")
        self.stream, self.n, self.repeats, self.rank, self.world_size = stream, int(n), repeats, rank, world_size
        # A buffer larger than a rank's share would hold copies of the same photos.
        self.seed, self.buffer, self.epoch = int(seed), max(1, min(int(buffer), math.ceil(n / world_size))), 0
        self.num_samples = math.ceil(math.ceil(len_factor * self.n) / world_size)
        #: {reference: reason} of the samples left out as read (no image, or no class), for the run's skips
        self.left_out: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def shards(self) -> list[str]:
        """This rank's shards this epoch, in the order it reads them."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.stream.shards), generator=g).tolist()
        return [self.stream.shards[i] for i in order[self.rank::self.world_size]]

    def _photos(self) -> Iterator[tuple[bytes, int, str]]:
        """(bytes, class, reference) of this rank's photos, read front to back, its shards again when done."""
        shards = self.shards()
        while True:
            read = 0
            for shard in shards:
                try:
                    for photo in labelled_photos(shard, self.stream):
                        if photo.data is None:
                            self.left_out[photo.ref] = photo.reason
                            continue
                        read += 1
                        yield photo.data, photo.label, photo.ref
                except SHARD_READ_ERRORS as exc:
                    raise UsageError(shard_failure(shard, exc)) from None
            if read == 0:
                raise UsageError(f"{self.stream.spec}: this process's shards hold no photo with a class")

    def _shuffled(self) -> Iterator[tuple[bytes, int, str]]:
        """``_photos`` through a shuffle buffer drawn from (seed, epoch, rank), without end."""
        rng = random.Random(epoch_seed(self.seed, self.epoch, self.rank))
        held: list = []
        for photo in self._photos():
            if len(held) < self.buffer:
                held.append(photo)
                continue
            j = rng.randrange(self.buffer)
            yield held[j]
            held[j] = photo

    def __iter__(self) -> Iterator:
        emitted = 0
        for data, label, ref in read_ahead(self._shuffled(), READ_AHEAD):
            for _ in range(self.repeats):
                if emitted == self.num_samples:
                    return
                position = emitted * self.world_size + self.rank  # the indexed sampler's dealing
                yield (data, label, ref, position), position, self.epoch
                emitted += 1


class _Failed:
    """An exception raised while reading ahead, to be raised again where the items are taken."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """``items``, the same in the same order, produced by a thread up to ``depth`` ahead: reading the shards (a
    file, a command's output from object storage) overlaps the training steps instead of delaying them. An
    exception raised while reading is raised here; when the taker stops, the thread stops and closes ``items``
    (ending a ``pipe:`` command)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the taker, which raises it
            put(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="fixres-shard-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class StreamedPhotos(Dataset):
    """A photo given by its key's bytes, through ``transform`` (``load_item``); the sampler's keys are the data."""

    def __init__(self, n: int, transform: Callable, *, reduced_decode: bool = True) -> None:
        self.n, self.transform, self.reduced_decode = n, transform, reduced_decode

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: tuple[bytes, int, str, int]):
        data, label, ref, position = item
        return load_item(data, ref, label, position, self.transform, reduced_decode=self.reduced_decode)


def training_order(samples, n: int, transform: Callable, hp: dict, env: dist.DistEnv) -> tuple[SeededSamples, Sampler]:
    """(dataset, sampler) of one rank's training photos: indexed ``samples`` through the repeated-augmentation
    sampler, or a ``ShardStream`` (``n`` photos) through ``ShardEpochs``; each sample augmented as seeded from
    (seed, epoch, position)."""
    common = dict(repeats=hp["repeats"], rank=env.rank, world_size=env.world_size, seed=hp["seed"],
                  len_factor=hp["epoch_length_factor"])
    if isinstance(samples, ShardStream):
        return (SeededSamples(StreamedPhotos(n, transform), hp["seed"]),
                ShardEpochs(samples, n, buffer=hp.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER), **common))
    return SeededSamples(ImageDataset(samples, transform), hp["seed"]), RepeatedAugSampler(n, keyed=True, **common)
