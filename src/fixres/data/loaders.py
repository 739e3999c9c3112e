"""Reading photos into batches: a data set over (path, label) samples, its batches and its loader.

Unreadable files do not stop a run: each is skipped, counted and named (``Skipped``), and the numbers on
the good files are unchanged. ``ImageDataset`` decodes a JPEG only as large as its transform needs
(``transforms.decode_plan``); ``collate`` stacks the good samples of a batch and keeps the skipped ones
aside; ``make_loader`` builds a DataLoader on them, with workers sized to the machine (``default_workers``) that yield
the cores to the model's threads (``yield_to_compute``);
batches go to page-locked memory only for a CUDA device (``pin_memory_for``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fixres.data.images import BadImage, load_rgb
from fixres.data.transforms import decode_plan
from fixres.errors import UsageError

#: Cap on DataLoader workers: decoding scales with cores, but past this we only burn memory.
MAX_WORKERS = 8
#: How much lower than the process they feed loader workers run (``os.nice``). Where the model runs on the same
#: cores, a worker that preempts one of its threads stalls the whole parallel region; at a low priority it decodes
#: in the gaps instead (lite0 on 2 cores: eval at 224 px and training at 128 px about 5% faster).
WORKER_NICENESS = 19


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be loaded: reported as {path, reason}."""

    index: int
    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


class ImageDataset(Dataset):
    """Samples of a ``FolderIndex`` through ``transform``; a bad file yields ``Skipped`` instead of raising.

    With ``reduced_decode`` (default) a JPEG is decoded only as large as ``transform`` needs
    (``transforms.decode_plan``: the resize side of test transforms, the drawn crop of train DA);
    where no reduction applies the photo takes exactly the full-decode path. Views of a sweep that
    need different reductions get one decode per distinct reduction, so each view's output is the
    one a single-view transform would give.

    ``corrupt``, if given, is called as ``corrupt(photo, i)`` on each decoded photo (``i``: the sample's
    index here) before ``transform``, e.g. a ``data.corruptions.Corruption``; the photo is then always
    decoded at full size, so the corruption happens to the photo as it was taken.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, *,
                 reduced_decode: bool = True, corrupt: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.reduced_decode = reduced_decode
        self.corrupt = corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return load_item(path, path, label, i, self.transform, reduced_decode=self.reduced_decode,
                         corrupt=self.corrupt)


def load_item(source: str | bytes, ref: str, label: int, i: int, transform: Callable, *, reduced_decode: bool,
              corrupt: Callable | None = None):
    """(transformed photo, label, i), or ``Skipped``: the photo ``source`` (a reference, or its bytes) decoded as
    ``ImageDataset`` says, ``ref`` naming it in a skip."""
    plan = decode_plan(transform) if reduced_decode and corrupt is None else None
    try:
        img = load_rgb(source, need=plan.need if plan is not None else None)
        if plan is None:
            return transform(img if corrupt is None else corrupt(img, i)), label, i
        # Views needing a coarser JPEG reduction than the first decode get their own (``FixedResizePlan``).
        return plan.finish(img, reload=lambda short: load_rgb(source, need=lambda _size: short)), label, i
    except BadImage as exc:
        if plan is not None:
            plan.abort()
        return Skipped(i, ref, str(exc))


@dataclass
class Batch:
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[Skipped]
    ends: list = field(default_factory=list)  # what a streamed source says of the shards it finished

    def __len__(self) -> int:
        return int(self.labels.numel())

    def pin_memory(self) -> "Batch":
        """This batch in page-locked memory (called by a DataLoader with ``pin_memory=True``).

        Without this method the DataLoader's pinning would pass a dataclass through unpinned, and the
        ``non_blocking`` host-to-GPU copies of ``engine.to_device`` would silently be synchronous.
        """
        inputs = self.inputs
        if isinstance(inputs, tuple):
            inputs = tuple(x.pin_memory() for x in inputs)
        elif inputs is not None:
            inputs = inputs.pin_memory()
        return Batch(inputs, self.labels.pin_memory(), self.indices.pin_memory(), self.skipped, self.ends)


def pin_memory_for(device: torch.device) -> bool:
    """Pin loader batches only for a CUDA device (page-locked memory lets the copy overlap compute);
    on the CPU pinning would only cost (and needs a GPU driver)."""
    return torch.device(device).type == "cuda"


def collate(items: list) -> Batch:
    """Stack the good samples, keep the skipped ones aside (a batch may end up empty)."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    if not good:
        return Batch(None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), skipped)
    xs, ys, idx = zip(*good)
    if isinstance(xs[0], (tuple, list)):
        inputs = tuple(torch.stack([x[k] for x in xs]) for k in range(len(xs[0])))
    else:
        inputs = torch.stack(xs)
    return Batch(inputs, torch.tensor(ys, dtype=torch.long), torch.tensor(idx, dtype=torch.long), skipped)


def yield_to_compute(_worker_id: int) -> None:
    """Every loader worker's start (``worker_init_fn``): it runs at a lower priority than the process it feeds."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # a platform without priorities: the worker decodes at the same one, only slower
        pass


def default_workers(world_size: int = 1) -> int:
    """DataLoader workers sized to the machine: the cores this process may use, shared across ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(MAX_WORKERS, cores // max(1, world_size)))


class IndexSampler(Sampler[int]):
    """Yield a fixed list of indices (a rank's shard), in order."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def as_batched(batch: Batch) -> Batch:
    """The collation of a dataset that yields whole batches: none."""
    return batch


def make_loader(dataset: Dataset, *, batch_size: int | None, sampler: Sampler | None = None, shuffle: bool = False,
                workers: int | None = None, generator: torch.Generator | None = None,
                drop_last: bool = False, pin_memory: bool = False, persistent: bool = False,
                collate_fn: Callable[[list], Batch] = collate) -> DataLoader:
    """``persistent``: the workers live from one pass over the loader to the next (a training run's epochs), so no
    epoch waits for them to start. ``batch_size`` None: the dataset yields whole batches (``collate_fn`` unused)."""
    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    workers = default_workers() if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
                      num_workers=workers, collate_fn=collate_fn if batch_size is not None else as_batched,
                      worker_init_fn=yield_to_compute,
                      generator=generator, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=persistent and workers > 0)
