"""Activation statistics after the global pooling (paper section 3.2, figures 3 and 4).

At a small test size the last feature map is tiny, so pooling averages few values: more pooled
activations are exactly 0 and the rest are more spread out; at a larger size the opposite. The
classifier was trained on the statistics of train_size. ``activation_stats`` measures, for several
test sizes in one pass over the images (one decode per image), the CDF of the pooled activations,
the fraction of zeros and the fraction above 2 (the two numbers the paper quotes), their mean and
standard deviation. Hooks are registered in a context manager and always removed.

Whether a fix brings the pooled activations at the test size S back toward those the classifier
was trained on (at T, figure 4) is measured by ``ks_distance``: the two-sample Kolmogorov-Smirnov
distance, the largest gap between the two empirical CDFs (0: the same distribution, 1: disjoint).

The photos are indexed (a folder, shards, a dataset) or streamed shards (``stats --stream``, and ``adapt --stream``
through ``forward_views``), read once front to back: every shard read whole, ``max_images`` then evenly spread in
the order read, batches never spanning two shards (so the same whatever the loader workers).

A model that pools LayerNorm'd tokens (ViT, ConvNeXt, ...) has pooled features of both signs, not
ReLU outputs: the CDF then starts below 0 and ``frac_negative`` says how many are negative.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fixres.config import DEFAULT_CDF_POINTS, DEFAULT_STATS_BATCH_SIZE, DataConfig, validate_size
from fixres.data.folders import FolderIndex
from fixres.data.loaders import ImageDataset, default_workers, make_loader
from fixres.data.shards import say_left_out
from fixres.data.streams import SHARD_STRIDE, ShardReading, ShardStream, StreamedShards, StreamOrder, shard_counts
from fixres.data.transforms import MultiView, build_transform
from fixres.errors import UsageError
from fixres.method.evaluate import modules_at_sizes
from fixres.models.hooks import capture
from fixres.models.structure import ModelParts, find_parts
from fixres.runtime import progress as prog
from fixres.runtime.dist import DistEnv
from fixres.runtime.engine import Precision, SingleThreaded, autocast, precision_for, prepare, to_device

#: The paper's spread indicator: fraction of pooled activations above this value.
ABOVE = 2.0
#: The CDF's x range ends at this quantile of the largest size's values (the tail is a few outliers).
CDF_QUANTILE = 0.999



def _samples(samples, max_images: int | None, seed: int = 0) -> list[tuple[str, int]]:
    if isinstance(samples, FolderIndex):
        samples = samples.samples
    samples = list(samples)
    if not samples:
        raise UsageError("no images given")
    return [samples[i] for i in spread_rows(len(samples), max_images)]


def spread_rows(n: int, max_images: int | None) -> list[int]:
    """The rows of ``n`` samples that are measured: all, or ``max_images`` evenly spread ones (samples are sorted
    by class, so every class stays represented)."""
    if max_images is None or n <= max_images:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, max_images).round().astype(int)]


class _Spread:
    """Whether a streamed photo (its index: shard number x ``SHARD_STRIDE`` + place in the shard) is one of the
    ``rows`` of the photos in the order read (``offsets``: the photos before each shard)."""

    def __init__(self, offsets: list[int], rows: list[int]) -> None:
        self.offsets, self.rows = offsets, set(rows)

    def __call__(self, index: int) -> bool:
        return self.offsets[index // SHARD_STRIDE] + index % SHARD_STRIDE in self.rows


def _streamed(stream: ShardStream, views, *, batch_size: int, workers: int, max_images: int | None, progress: bool):
    """(loader over ``stream``'s shards read once, each photo through ``views``; the photos it reads or None;
    a check to call after the pass: every shard read whole, the samples left out said). ``max_images``: the
    evenly spread photos in the order read (shards in order), counted first (``shard_counts``)."""
    keep, total = None, None
    if max_images is not None:
        counts = shard_counts(stream, stream.shards, progress=progress)
        rows = spread_rows(sum(counts), max_images)
        keep, total = _Spread(np.cumsum([0] + counts[:-1]).tolist(), rows), len(rows)
    # Batches within a shard: the same batches whatever the workers (bn-recalibrate weighs every batch equally).
    reading = ShardReading(make_loader(StreamedShards(stream, views, rank=0, world_size=1, keep=keep,
                                                      batch_size=batch_size), batch_size=None, workers=workers))

    def check() -> None:
        order = StreamOrder(stream, reading.ends)
        order.check()
        say_left_out(order.left, enabled=progress)
    return reading, total, check


def iterate_views(samples, cfg: DataConfig, sizes: Sequence[int], *, batch_size: int, workers: int | None,
                  progress: bool = True, desc: str = "images", max_images: int | None = None
                  ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor, list]]:
    """Batches of (views at each size with the test pre-processing, labels, skipped): one decode per image.
    ``samples``: indexed photos, or a ``ShardStream`` read once front to back (``max_images``: evenly spread in
    the order read)."""
    workers = default_workers() if workers is None else workers
    views = MultiView([build_transform("test", size=s, cfg=cfg) for s in sizes])
    views = SingleThreaded(views) if workers == 0 else views
    if isinstance(samples, ShardStream):
        loader, total, check = _streamed(samples, views, batch_size=batch_size, workers=workers,
                                         max_images=max_images, progress=progress)
    else:
        samples = _samples(samples, max_images)
        loader, total, check = make_loader(ImageDataset(samples, views), batch_size=batch_size,
                                           workers=workers), len(samples), None
    bar = prog.bar(total, desc, enabled=progress)
    try:
        for batch in loader:
            bar.update(len(batch) + len(batch.skipped))
            if batch.inputs is None:
                yield None, batch.labels, batch.skipped
                continue
            inputs = batch.inputs if isinstance(batch.inputs, tuple) else (batch.inputs,)
            yield inputs, batch.labels, batch.skipped
    finally:
        bar.close()
    if check is not None:
        check()


def forward_views(model: nn.Module, samples, cfg: DataConfig, sizes: Sequence[int], *, env: DistEnv,
                  precision: Precision, hooks: tuple | None = None, min_batch: int = 1, copies: bool = True,
                  desc: str = "images", batch_size: int, workers: int | None, progress: bool = True,
                  max_images: int | None = None) -> tuple[int, list]:
    """Run ``model`` (no gradients) on every readable image at every size, one decode per image.

    ``hooks``: (module names, "input" | "output", fn(size, name, tensor)): what is measured, captured on
    the module that runs each size (``evaluate.modules_at_sizes``: a fixed-input-size model runs other
    sizes through moved copies; ``copies=False`` runs ``model`` itself, for methods that change it).
    Batches with fewer than ``min_batch`` images are skipped (a batch-norm in training mode needs two).
    Returns (images used, skipped files as dicts).
    """
    runners = modules_at_sizes(model, sizes) if copies else {s: model for s in sizes}
    current = [sizes[0]]
    images, skipped = 0, []
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if hooks is not None:
            names, where, fn = hooks
            for m in {id(m): m for m in runners.values()}.values():
                stack.enter_context(capture(m, names, where=where, fn=lambda name, t: fn(current[0], name, t)))
        for views, _labels, skip in iterate_views(samples, cfg, sizes, batch_size=batch_size, workers=workers,
                                                  progress=progress, desc=desc, max_images=max_images):
            skipped.extend(s.to_dict() for s in skip)
            if views is None or views[0].shape[0] < min_batch:
                continue
            images += views[0].shape[0]
            for size, x in zip(sizes, views):
                current[0] = size
                with autocast(env.device, precision):
                    runners[size](to_device(x, env.device, precision))
    return images, skipped


def pooled_point(parts: ModelParts) -> tuple[str, str]:
    """(module name, "output"|"input") where the pooled vector can be read."""
    if parts.pool is not None:
        return parts.pool, "output"
    return parts.classifier, "input"


def collect_pooled(model: nn.Module, samples, cfg: DataConfig, *, test_sizes: Sequence[int],
                   batch_size: int = DEFAULT_STATS_BATCH_SIZE, env: DistEnv | None = None,
                   precision: Precision | None = None, workers: int | None = None, max_images: int | None = None,
                   progress: bool = True, parts: ModelParts | None = None) -> tuple[dict[int, np.ndarray], list]:
    """Pooled activations {test_size: array (images, channels)} and the skipped files."""
    env = env or DistEnv()
    precision = precision or precision_for(env.device)
    model = prepare(model, env.device, precision)
    parts = parts or find_parts(model)
    name, where = pooled_point(parts)
    sizes = [validate_size(int(s), "test_size") for s in test_sizes]
    out: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    model.eval()

    def sink(size, _name, t):
        out[size].append(t.float().flatten(1).cpu().numpy())

    _, skipped = forward_views(model, samples, cfg, sizes, env=env, precision=precision, hooks=([name], where, sink),
                               desc="pooled activations", batch_size=batch_size, workers=workers, progress=progress,
                               max_images=max_images)
    if not any(out[s] for s in sizes):
        raise UsageError("no readable image to measure activations on")
    return {s: np.concatenate(v) for s, v in out.items()}, skipped


def summarize(values: np.ndarray, grid: np.ndarray) -> dict:
    """CDF on ``grid``, fraction of zeros, fraction above 2, mean and std of pooled activations."""
    v = np.sort(values.ravel())
    n = max(1, v.size)
    return {
        "cdf_x": grid.tolist(),
        "cdf": (np.searchsorted(v, grid, side="right") / n).tolist(),
        "frac_zero": float(np.mean(v == 0.0)) if v.size else 0.0,
        "frac_above_2": float(np.mean(v > ABOVE)) if v.size else 0.0,
        "frac_negative": float(np.mean(v < 0.0)) if v.size else 0.0,
        "mean": float(v.mean()) if v.size else 0.0,
        "std": float(v.std()) if v.size else 0.0,
        "n_values": int(v.size),
    }


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: max over x of |F_a(x) - F_b(x)|, the empirical CDFs of all values."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise UsageError("the Kolmogorov-Smirnov distance needs values on both sides")
    x = np.concatenate([a, b])  # the sup is reached at one of the sample points
    return float(np.max(np.abs(np.searchsorted(a, x, side="right") / a.size
                               - np.searchsorted(b, x, side="right") / b.size)))


def cdf_grid(arrays: Sequence[np.ndarray], points: int = DEFAULT_CDF_POINTS) -> np.ndarray:
    lo = min(0.0, min(float(np.min(a)) for a in arrays))
    hi = max(float(np.quantile(a, CDF_QUANTILE)) for a in arrays)
    return np.linspace(lo, max(hi, lo + 1e-6), points)


def measured_sizes(cfg: DataConfig, test_sizes: Sequence[int], reference_size: int | None = None,
                   reference: np.ndarray | None = None) -> list[int]:
    """The sizes ``activation_stats`` reads pooled values at: ``test_sizes``, and the reference size unless the
    reference values are given."""
    sizes = [int(s) for s in test_sizes]
    ref_size = int(reference_size or cfg.train_size)
    return sizes + ([ref_size] if reference is None and ref_size not in sizes else [])


def activation_stats(model: nn.Module, samples, cfg: DataConfig, *, test_sizes: Sequence[int],
                     batch_size: int = DEFAULT_STATS_BATCH_SIZE, env: DistEnv | None = None,
                     precision: Precision | None = None, workers: int | None = None, max_images: int | None = None,
                     progress: bool = True, cdf_points: int = DEFAULT_CDF_POINTS,
                     grid: np.ndarray | None = None, reference_size: int | None = None,
                     reference: np.ndarray | None = None, keep_pooled: bool = False,
                     pooled: tuple[dict[int, np.ndarray], list] | None = None) -> dict:
    """Per test size: CDF points of the pooled activations, fraction of zeros, fraction above 2 (figure 3).

    Returns {"sizes": [{"test_size", "cdf_x", "cdf", "frac_zero", "frac_above_2", "frac_negative", "mean",
    "std", "n_values", "ks_to_reference"}...], "ks_reference", "pooled_from", "num_features", "n_images",
    "skipped"}. ``grid`` fixes the CDF's x points (to compare two models on the same axis).
    ``ks_to_reference``: the Kolmogorov-Smirnov distance to this model's pooled values at
    ``reference_size`` (default: the train size, measured in the same pass), or to ``reference``
    when given (e.g. the values of the model before a fix at its train size, to see whether the
    fix brings the activations at S toward them). ``keep_pooled``: also return ``_pooled``
    ({size: values}, not JSON: pop it). ``pooled``: ({size: values}, skipped files) already read at every size of
    ``measured_sizes`` (e.g. replayed from the activations at a cut, ``CutCache.pooled``): no forward runs.
    """
    parts = find_parts(model)
    sizes = [validate_size(int(s), "test_size") for s in test_sizes]
    ref_size = validate_size(int(reference_size or cfg.train_size), "reference_size")
    if pooled is None:
        pooled = collect_pooled(model, samples, cfg, test_sizes=measured_sizes(cfg, sizes, reference_size, reference),
                                batch_size=batch_size, env=env, precision=precision, workers=workers,
                                max_images=max_images, progress=progress, parts=parts)
    pooled, skipped = pooled
    if not any(len(pooled[s]) for s in sizes):
        raise UsageError("no readable image to measure activations on")
    ref_values = pooled[ref_size] if reference is None else np.asarray(reference)
    grid = cdf_grid([pooled[s] for s in sizes], cdf_points) if grid is None else np.asarray(grid)
    rows = [{"test_size": s, **summarize(pooled[s], grid), "ks_to_reference": ks_distance(pooled[s], ref_values)}
            for s in sizes]
    name, where = pooled_point(parts)
    out = {"sizes": rows, "pooled_from": f"{where} of {name}", "num_features": parts.num_features,
           "n_images": int(next(iter(pooled.values())).shape[0]), "skipped": skipped, "train_size": cfg.train_size,
           "ks_reference": {"test_size": ref_size, "values": "this model's" if reference is None else "given"}}
    if keep_pooled:
        out["_pooled"] = pooled
    return out


__all__ = ["activation_stats", "collect_pooled", "measured_sizes", "spread_rows", "forward_views", "iterate_views",
           "ks_distance", "summarize", "cdf_grid", "pooled_point"]
