"""Repeated augmentation (paper section 5, after Hoffer et al. and MultiGrain [5]): the epoch order.

Each epoch: shuffle the ``n`` image indices with a generator seeded by (seed, epoch), repeat every
index ``repeats`` times *consecutively* (``[a, a, a, b, b, b, ...]``), pad by wrapping so the list
splits evenly, and deal it to the ranks with a stride (rank r takes positions r, r + W, r + 2W ...).
Consecutive copies therefore land on different ranks at the same step, i.e. in the same *global*
batch, each with its own random augmentation (each rank has its own augmentation RNG).

An epoch draws ``num_samples = ceil(len_factor * n / world_size)`` per rank. With ``len_factor``
1 (timm's default) that is one data set's worth of samples in all, so it sees ~``n / repeats``
distinct images, each ``repeats`` times; a fresh shuffle every epoch spreads the coverage over
epochs. The official FixRes code uses ``RASampler(len_factor=2.0)`` (``PAPER_LEN_FACTOR``): about
2N samples per epoch, ~``2 n / repeats`` distinct images, so its 30-epoch learning-rate steps see
twice the samples; the paper recipe needs that factor to reproduce the paper's schedule.

Single process (world_size 1) is the same rule with one rank: the epoch is the first ``n`` entries
of the repeated, shuffled list, so each batch holds ~batch/repeats distinct images with ``repeats``
augmentations each, which is exactly the global batch that W ranks would build together.
Hence a K-rank run and a one-process run with the same global batch see the same images per step.
(Shuffling *after* repeating would instead give ~70% distinct images per epoch but put copies in
different steps, which is not repeated augmentation any more.) ``repeats=1`` is a plain seeded
distributed shuffle.

**The augmentation draws.** With ``keyed=True`` the sampler yields (index, position, epoch) keys, the
position being the sample's place in the epoch's global list; ``SeededSamples`` seeds every random
generator from (seed, epoch, position) just before it reads and augments that sample (and, in the
training process itself, puts the generators back afterwards). A sample's crop and flip then depend on
nothing else: not on which loader worker reads it, how many workers there are, or what the process drew
before, so the same seed gives the same weights with 0, 1 or 8 workers, and a resume with other workers
continues the same run. The key carries the epoch, so the loader's workers can live across epochs. The
repeated copies of an image sit at consecutive positions, so each still gets its own augmentation.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from fixres.config import DEFAULT_REPEATS
from fixres.errors import UsageError

#: Epoch length of the official FixRes training code (``RASampler(..., len_factor=2.0)``): ~2N samples.
PAPER_LEN_FACTOR = 2.0
#: Mixes seed and epoch into one generator seed (a large odd constant keeps (seed, epoch) pairs apart).
_SEED_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Deterministic seed for (seed, epoch[, rank]): the sampler, the loader and the augmentations use it."""
    return (int(seed) * _SEED_STRIDE + int(epoch)) * 1009 + int(rank)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one sample's augmentation: a hash of (seed, epoch, position), below 2**32 (numpy's range).
    A hash rather than arithmetic, so that no two (epoch, position) pairs of a run share a seed by accident."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{int(position)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class RepeatedAugSampler(Sampler[int]):
    """Indices of one rank for one epoch, each image repeated ``repeats`` times across ranks.

    ``num_samples`` (per rank) defaults to ``ceil(len_factor * n / world_size)`` (``len_factor`` 1:
    one data set's worth; ``PAPER_LEN_FACTOR`` 2: the official FixRes epoch); pass
    ``samples_per_epoch`` to draw another global count (``repeats * n`` covers every copy of every
    image once). Call ``set_epoch(e)`` before iterating, as with ``DistributedSampler``.
    """

    def __init__(self, n: int, repeats: int = DEFAULT_REPEATS, rank: int = 0, world_size: int = 1,
                 seed: int = 0, *, samples_per_epoch: int | None = None, shuffle: bool = True,
                 len_factor: float = 1.0, keyed: bool = False) -> None:
        if n <= 0:
            raise UsageError("repeated-augmentation sampler needs at least one sample")
        if repeats < 1:
            raise UsageError(f"repeats must be >= 1, got {repeats}")
        if world_size < 1 or not (0 <= rank < world_size):
            raise UsageError(f"rank {rank} is not in a world of {world_size}")
        if not (math.isfinite(len_factor) and len_factor > 0):
            raise UsageError(f"len_factor must be a positive number, got {len_factor}")
        self.n, self.repeats, self.rank, self.world_size = int(n), int(repeats), int(rank), int(world_size)
        self.seed, self.shuffle, self.epoch, self.len_factor = int(seed), shuffle, 0, float(len_factor)
        self.keyed = keyed  # yield (index, position in the epoch, epoch) for ``SeededSamples``
        total = math.ceil(self.len_factor * self.n) if samples_per_epoch is None else int(samples_per_epoch)
        if total <= 0:
            raise UsageError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.num_samples = math.ceil(total / self.world_size)
        # The repeated list padded to a multiple of world_size, and long enough for num_samples per rank.
        self.total_size = max(math.ceil(self.n * self.repeats / self.world_size),
                              self.num_samples) * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self) -> list[int]:
        """The whole epoch's list before it is dealt to the ranks (the same on every rank)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch_seed(self.seed, self.epoch))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        order = torch.repeat_interleave(perm, self.repeats).tolist()
        while len(order) < self.total_size:  # wrap-around padding, as DistributedSampler does
            order += order[: self.total_size - len(order)]
        return order[: self.total_size]

    def __iter__(self) -> Iterator:
        positions = range(self.rank, self.total_size, self.world_size)[: self.num_samples]
        order = self.global_order()
        if self.keyed:
            return iter([(order[p], p, self.epoch) for p in positions])
        return iter([order[p] for p in positions])

    def __len__(self) -> int:
        return self.num_samples


class SeededSamples(Dataset):
    """``dataset`` read through (index, position, epoch) keys, each sample's random draws seeded from (seed, epoch,
    position) (``sample_seed``). In the training process itself (no loader workers) its generators are put back
    afterwards, so that reading leaves its own random stream (dropout, drop-path) untouched; a loader worker draws
    nothing else, and skips that."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, position, epoch = key
        s = sample_seed(self.seed, epoch, position)
        if get_worker_info() is not None:
            _seed_all(s)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            _seed_all(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
