"""The frozen-prefix cache of a fine-tuning (``fixres.method.finetuning``): built once before its epochs.

With the deterministic test DA everything before the first adapted module computes the same activations every
epoch: a check that the model runs from the cut on (``prefix.build_suffix``), then one pass over the training
photos (and, for ``--epoch-eval``, the validation photos) recording the activations entering the cut
(``prefix.fill_cache``), or the cache an earlier fine-tuning of the same photos left (``cutcache.FitCaches``).
Under torchrun every rank takes the cache or none of them does.

Streamed training shards (``finetune --stream``) fill it in one read front to back: each rank reads its shards
(``data.streams.StreamedShards``), its photos take the cache's rows in the order read, and ``rows`` then lists
them in the order the same shards indexed give (class, then key; ``StreamOrder.positions``), so the epochs draw
their batches over the same positions as an indexed fine-tuning: on one process, the same photos in the same
batches. The cache is sized for the photos of all the shards (``n_train``); memory is only used by the rows filled.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from fixres.data.loaders import make_loader
from fixres.data.shards import say_left_out
from fixres.data.streams import (
    SHARD_STRIDE,
    ShardReading,
    ShardStream,
    StreamedShards,
    StreamOrder,
    labelled_photos,
    stream_collate,
)
from fixres.data.transforms import build_transform
from fixres.errors import UsageError
from fixres.method.prefix import _cache_folder, build_suffix, fill_cache, first_inputs, record_cut
from fixres.method.tunerecipe import _set_modes
from fixres.runtime.dist import all_gather_objects, all_reduce_sum_int


def build_cache(t, *, enabled: bool, budget_mb: float) -> None:
    """The frozen-prefix cache of the fine-tuning ``t`` (a ``finetuning._Tune``); sets t.suffix / t.train_cache /
    t.cache_info."""
    if not enabled:
        t.cache_info["reason"] = "disabled"
        return
    if t.settings["augment"] != "test":
        t.cache_info["reason"] = f"augmentation {t.settings['augment']!r} is random: full forward each epoch"
        return
    t0 = time.perf_counter()
    if isinstance(t.full_train, ShardStream):
        with contextlib.closing(_first_shard_photos(t.full_train)) as photos:
            sample = first_inputs(photos, t.transform, t.env.device)  # the same on every rank
    else:
        sample = first_inputs(t.full_train, t.transform, t.env.device)
    if sample is None:
        t.cache_info["reason"] = "no readable sample image"
    else:
        t.suffix, t.cache_info["reason"] = build_suffix(t.model, t.chain, t.sel.first, sample)
    if t.suffix is not None:
        _fill_caches(t, budget_bytes=int(budget_mb * 2 ** 20))
    _set_modes(t.model, t.sel)
    t.t_cache = time.perf_counter() - t0
    t.cache_info["build_s"] = round(t.t_cache, 3)
    t.status(f"activation cache: {'used, ' if t.suffix is not None else 'not used: '}{t.cache_info['reason']}")


def _fill_caches(t, *, budget_bytes: int) -> None:
    t.model.eval()  # the prefix is frozen: eval mode throughout while filling
    kw = dict(batch_size=t.settings["batch_size"], workers=t.workers, device=t.env.device, precision=t.precision,
              budget_bytes=budget_bytes, progress=t.progress)
    hit = t.shared.lookup(t) if t.shared is not None else None
    streamed = isinstance(t.train_samples, ShardStream)
    fill = _StreamedFill(t.env, t.settings["n_train"]) if streamed else fill_cache
    t.train_cache, t.skipped = hit or fill(t.model, t.suffix, t.train_samples, t.transform,
                                           folder=t.out_dir / _cache_folder("cache", t.env),
                                           desc=f"caching activations at {t.suffix.cut}", **kw)
    if t.shared is not None and hit is None and t.train_cache is not None:
        t.shared.keep(t, t.train_cache, t.skipped)
    if t.epoch_eval and t.val_samples and not t.env.distributed and not isinstance(t.val_samples, ShardStream):
        t.val_cache, _ = fill_cache(t.model, t.suffix, t.val_samples,
                                     build_transform("test", size=t.settings["test_size"], cfg=t.cfg),
                                     folder=t.out_dir / "cache_val", desc="caching validation activations", **kw)
    if t.env.distributed and all_reduce_sum_int(int(t.train_cache is None), t.env):
        if t.train_cache is not None:  # all ranks must take the same path
            t.train_cache.close()
            t.train_cache = None
    if t.train_cache is None:
        t.suffix = None
        t.cache_info["reason"] = "no readable training image"
        return
    if streamed:  # each rank's photos: those of its shards, as many as they hold
        t.rows = fill.rows
        t.steps_per_epoch = max(all_gather_objects(math.ceil(len(t.rows) / t.local_batch), t.env))
    t.cache_info.update(used=True, cut=t.suffix.cut, bytes=t.train_cache.bytes, on_disk=t.train_cache.on_disk,
                        shape=list(t.train_cache.shape))


def _first_shard_photos(stream: ShardStream):
    """(bytes, class) of the photos of ``stream``'s first shard, read front to back (close it when done)."""
    for photo in labelled_photos(stream.shards[0], stream):
        if photo.data is not None:
            yield photo.data, photo.label


class _StreamRows:
    """The cache rows of a streamed fill: each batch's photos take the next rows (``__call__``, ``at``: streamed
    index to row)."""

    def __init__(self, capacity: int, count_given: bool) -> None:
        self.capacity, self.count_given, self.filled = capacity, count_given, 0
        self.at: dict[int, int] = {}

    def __call__(self, batch) -> torch.Tensor:
        rows = torch.arange(self.filled, self.filled + len(batch))
        if self.filled + len(batch) > self.capacity:
            raise UsageError(f"the shards hold more than the {self.capacity} photos "
                             + ("--train-count says" if self.count_given else "counted"))
        self.at.update(zip(batch.indices.tolist(), rows.tolist()))
        self.filled += len(batch)
        return rows


class _StreamedFill:
    """``prefix.fill_cache`` for a ``ShardStream``: this rank's shards read once; ``rows`` after the call."""

    def __init__(self, env, n: int) -> None:
        self.env, self.n, self.rows = env, n, torch.empty(0, dtype=torch.long)

    def __call__(self, model, suffix, stream: ShardStream, transform, *, batch_size, workers, device, precision,
                 budget_bytes, folder, progress, desc):
        env = self.env
        place = _StreamRows(self.n, stream.count is not None)
        reading = ShardReading(make_loader(StreamedShards(stream, transform, rank=env.rank, world_size=env.world_size),
                                           batch_size=batch_size, workers=workers, collate_fn=stream_collate))
        cache, skipped = record_cut(model, suffix, reading, self.n, device=device,
                                    precision=precision, budget_bytes=budget_bytes, folder=folder,
                                    progress=progress, desc=desc, rows=place,
                                    shown=self.n if env.world_size == 1 else None)
        order = StreamOrder(stream, [e for ends in all_gather_objects(reading.ends, env) for e in ends])
        order.check()
        if stream.count is not None and order.total != stream.count:
            raise UsageError(f"--train-count {stream.count}, but the shards hold {order.total} photos with a class")
        say_left_out(order.left, enabled=progress and env.is_main)
        skipped += [{"path": ref, "reason": why} for ref, why in order.left if env.is_main]
        at = order.positions()
        mine = sorted((at[e.shard * SHARD_STRIDE + k], e.shard * SHARD_STRIDE + k)
                      for e in reading.ends for k in range(len(e.entries)))
        self.rows = torch.tensor([place.at.get(i, -1) for _, i in mine], dtype=torch.long)
        return cache, skipped
