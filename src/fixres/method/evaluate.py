"""Evaluation at any test resolution: one pass over the data, exact counts, error bars (paper section 5).

``evaluate`` decodes each image once per distinct JPEG reduction its views need (one decode for
photos or sizes where no reduction applies, 1-4 otherwise) and feeds every requested view, one per
(test_size, crop_ratio) pair (``transforms.MultiView``), to the model; so a sweep of K sizes costs
far fewer decodes than K evaluations, and each of its rows equals the single-size evaluation exactly. For every view
it reports top-1, top-5, mean cross-entropy and per-class top-1, plus multi-resolution ensembles (averaged softmax over
sizes, section 5.1) and optional 10-crop testing. Significance follows section 5: the images are split into ``folds``
folds, accuracy is measured on all folds but one, leaving each out in turn, and the standard deviation of
those accuracies is kept next to every figure (``fold_std``, ``top1_std``). That spread is far smaller
than the sampling uncertainty of an accuracy, so the error bar shown (``top1_se``) is the binomial
standard error (``fixres.choosing.significance.binomial_se``). Next to top-1, every row has its
calibration (``fixres.method.calibration``): the NLL and the expected calibration error over 15 bins of
top-1 confidence, and ``temperature_scale`` fits a temperature per view on held-out images.

Counts are exact under torchrun: each rank takes a strided shard of the data set (no padding, no
duplicates), counts are summed with ``all_reduce_sum`` and the per-image outcomes are gathered
(``all_gather_objects``) and put back in data-set order, so fold std, loss and per-class numbers
of K processes are those of a single process. The request itself (views, ensembles, samples, the model's
classes) is checked before any image is read (``fixres.method.views``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fixres.choosing.significance import binomial_se
from fixres.config import DEFAULT_BATCH_SIZE, DEFAULT_FOLDS, DataConfig
from fixres.data.loaders import ImageDataset, IndexSampler, default_workers, make_loader, pin_memory_for
from fixres.data.streams import ShardStream
from fixres.data.transforms import MultiView, geometry_for, ten_crop_transform, test_transform
from fixres.errors import FixresError, UsageError
from fixres.io.evaluation import PERCENT, EvalResult, FittedOn, PhotoArrays
from fixres.io.schema import parse
from fixres.method.calibration import apply_temperature, ece, fit_temperature, nll, reliability
from fixres.method.views import _check_classes, _Plan, _plan
from fixres.models.fold import fold_batchnorms
from fixres.models.loading import fit_input_size, fixed_input_size
from fixres.runtime import dist as fdist
from fixres.runtime.engine import Precision, SingleThreaded, autocast, inference_precision, prepare, to_device
from fixres.runtime.progress import bar

#: top-5 is the paper's second metric; with fewer classes it degrades to top-K with K = classes.
TOP5 = 5


def fold_std(correct: Sequence[bool] | np.ndarray, folds: int = DEFAULT_FOLDS) -> float:
    """Leave-one-fold-out standard deviation of accuracy, in percent (paper section 5).

    Image ``i`` (in data-set order) belongs to fold ``i % folds``; the accuracy on all folds but
    fold k is computed for each k, and the (population) std of those ``folds`` accuracies returned.
    With fewer images than folds each image is its own fold; fewer than 2 images give 0.
    """
    c = np.asarray(correct, dtype=np.float64).ravel()
    n = c.size
    if folds < 2:
        raise UsageError(f"folds must be at least 2, got {folds}")
    k = min(folds, n)
    if k < 2:
        return 0.0
    fold_of = np.arange(n) % k
    fold_n = np.bincount(fold_of, minlength=k).astype(np.float64)
    fold_hits = np.bincount(fold_of, weights=c, minlength=k)
    accs = (c.sum() - fold_hits) / (n - fold_n)
    return float(np.std(accs) * PERCENT)


def _scores(logits: torch.Tensor, labels: torch.Tensor, k5: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image (top-1 hit, top-5 hit, cross-entropy) from log-probabilities.

    The rank of the true class counts the classes scoring higher, and among equal scores those with a
    lower index, which is how ``argmax`` (used by train and finetune logs) breaks ties: a model whose
    logits are all equal is not "always right". A row with a non-finite score counts as wrong.
    """
    true = logits.gather(1, labels[:, None])
    lower_index = torch.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = (logits > true).sum(1) + ((logits == true) & lower_index).sum(1)
    rank = torch.where(torch.isfinite(logits).all(1), rank, logits.shape[1])
    return ((rank == 0).numpy(), (rank < k5).numpy(), (-true[:, 0]).double().numpy())


@dataclass
class PerImage:
    """Per-image outcomes, one row per view and ensemble: top-1/top-5 hits, cross-entropy, top-1 confidence."""

    idx: np.ndarray
    labels: np.ndarray
    top1: np.ndarray   # (rows, images) bool
    top5: np.ndarray
    loss: np.ndarray   # (rows, images) float64
    conf: np.ndarray   # (rows, images) float64: the largest softmax probability
    log_probs: list | None = None  # per row, (images, classes) float32, when asked for

    @classmethod
    def concat(cls, parts: Sequence["PerImage"], n_rows: int) -> "PerImage":
        def cat(name, dtype, axis):
            arrays = [getattr(p, name) for p in parts]
            if arrays:
                return np.concatenate(arrays, axis=axis)
            return np.zeros((n_rows, 0) if axis else 0, dtype)
        keep = parts and all(p.log_probs is not None for p in parts)
        lps = [np.concatenate([p.log_probs[r] for p in parts]) for r in range(n_rows)] if keep else None
        return cls(cat("idx", np.int64, 0), cat("labels", np.int64, 0), cat("top1", bool, 1), cat("top5", bool, 1),
                   cat("loss", np.float64, 1), cat("conf", np.float64, 1), lps)

    def reordered(self, order: np.ndarray) -> "PerImage":
        lps = [lp[order] for lp in self.log_probs] if self.log_probs is not None else None
        return PerImage(self.idx[order], self.labels[order], self.top1[:, order], self.top5[:, order],
                         self.loss[:, order], self.conf[:, order], lps)


def gather_in_order(local: PerImage, env: fdist.DistEnv, n_rows: int) -> PerImage:
    """Every rank's per-image outcomes, back in data-set order (the single-process order).

    Ranks hold strided shards, so the gathered concatenation is interleaved; the fold std assigns
    image ``i`` to fold ``i % folds``, so it is only the single-process number after this re-ordering.
    """
    gathered = fdist.all_gather_objects(local, env)
    merged = PerImage.concat(gathered, n_rows)
    return merged.reordered(np.argsort(merged.idx, kind="stable"))


def modules_at_sizes(model: nn.Module, sizes: Iterable[int]) -> dict[int, nn.Module]:
    """The module that runs each size: ``model`` itself, or, for a model with a fixed input size, a copy
    moved to that size (timm's ``set_input_size``, via ``models.fit_input_size``), so one pass over the
    images still serves every size and the caller's model is left as it was."""
    fixed = fixed_input_size(model)
    at: dict[int, nn.Module] = {}
    for size in sizes:
        if size not in at:
            at[size] = model if fixed is None or size == fixed else copy.deepcopy(model)
            fit_input_size(at[size], size)
    return at


def _forward_views(models: Sequence[nn.Module], inputs: tuple, b: int, *, ten_crop: bool, env: fdist.DistEnv,
                   precision: Precision, on_view: Callable[[int], None] | None = None
                   ) -> tuple[list[torch.Tensor], int]:
    """Log-probabilities of every view of one batch (fp32 on the CPU) and the number of fp32 retries;
    ``on_view(i)`` is told which view runs next."""
    logps, fallbacks = [], 0
    for i, (x, model) in enumerate(zip(inputs, models, strict=True)):
        if on_view is not None:
            on_view(i)
        if ten_crop:
            x = x.reshape(-1, *x.shape[-3:])
        x = to_device(x, env.device, precision)
        with autocast(env.device, precision):
            logits = model(x)
        if precision.amp and not torch.isfinite(logits).all():
            # fp16 overflow (or a bf16 oddity): this batch again in fp32, counted in the result.
            fallbacks += 1
            logits = model(x.float())
        logits = logits.float().cpu()
        if ten_crop:
            # Average the softmax of the 10 crops (not the logits), like a multi-crop ensemble.
            logps.append(torch.log_softmax(logits, 1).reshape(b, -1, logits.shape[1]).logsumexp(1)
                         - math.log(logits.shape[0] // b))
        else:
            logps.append(torch.log_softmax(logits, 1))
    return logps, fallbacks


def batch_outcomes(logps: list[torch.Tensor], plan: _Plan, batch, keep_log_probs: bool) -> PerImage:
    """Per-image outcomes of one batch (``batch.indices``, ``batch.labels``) from each view's log-probabilities."""
    pos = {v: i for i, v in enumerate(plan.views)}
    for members in plan.ens_views:
        # Section 5.1: classify at several resolutions and average the class probabilities.
        stacked = torch.stack([logps[pos[v]] for v in members])
        logps.append(stacked.logsumexp(0) - math.log(len(members)))
    k5 = min(TOP5, logps[0].shape[1])
    scores = [_scores(lp, batch.labels, k5) for lp in logps]
    conf = np.stack([lp.max(1).values.exp().double().numpy() for lp in logps])
    return PerImage(batch.indices.numpy().astype(np.int64), batch.labels.numpy().astype(np.int64),
                     np.stack([s[0] for s in scores]), np.stack([s[1] for s in scores]),
                     np.stack([s[2] for s in scores]), conf,
                     [lp.numpy() for lp in logps] if keep_log_probs else None)


def _run_local(models: Sequence[nn.Module], loader, plan: _Plan, *, total: int, ten_crop: bool,
               env: fdist.DistEnv, precision: Precision, progress: bool, keep_log_probs: bool, record=None):
    """This rank's pass over its shard: (per-image outcomes, skipped, number of outputs, fp32 retries)."""
    parts: list[PerImage] = []
    skipped: list[tuple[int, str, str]] = []
    n_out, fallbacks = None, 0
    n_views = len(plan.views)
    pbar = bar(total, f"eval {n_views} view{'s' if n_views > 1 else ''}", enabled=progress and env.is_main)
    with pbar, torch.inference_mode():
        for batch in loader:
            skipped.extend((s.index, s.path, s.reason) for s in batch.skipped)
            if batch.inputs is not None:
                inputs = batch.inputs if isinstance(batch.inputs, tuple) else (batch.inputs,)
                logps, retries = _forward_views(models, inputs, len(batch.labels), ten_crop=ten_crop, env=env,
                                                precision=precision, on_view=record.view if record else None)
                fallbacks += retries
                if record is not None:
                    record.batch_done(batch.indices, batch.labels)
                if n_out is None:
                    n_out = logps[0].shape[1]
                    _check_classes(n_out, plan.num_classes, plan.max_label)
                parts.append(batch_outcomes(logps, plan, batch, keep_log_probs))
            pbar.update(len(batch.skipped) + (0 if batch.inputs is None else len(batch.labels)))
    return PerImage.concat(parts, n_views + len(plan.ens_views)), skipped, n_out, fallbacks


def _check_coverage(res: PerImage, counts: torch.Tensor, skipped: list, n_samples: int) -> None:
    n, n_rows = int(res.idx.size), res.top1.shape[0]
    if np.unique(res.idx).size != n or n + len(skipped) != n_samples:
        raise FixresError(f"internal error: ranks covered {n} + {len(skipped)} skipped of {n_samples} images")
    if int(counts[-1, 0]) != len(skipped) or any(
            int(counts[r, 0]) != n or int(counts[r, 1]) != int(res.top1[r].sum())
            or int(counts[r, 2]) != int(res.top5[r].sum()) for r in range(n_rows)):
        raise FixresError("internal error: reduced counts differ from the gathered per-image results")
    if n == 0:
        first = f" (first: {skipped[0][1]}: {skipped[0][2]})" if skipped else ""
        raise UsageError(f"no image could be read: all {len(skipped)} were skipped{first}")


def _summary(res: PerImage, r: int, folds: int) -> dict:
    n = int(res.idx.size)
    loss = float(res.loss[r].sum() / n)
    top1, top5 = float(res.top1[r].sum()) * PERCENT / n, float(res.top5[r].sum()) * PERCENT / n
    # The error bar is the binomial standard error; the fold std (section 5) is kept under its own name.
    return {"top1": top1, "top1_se": binomial_se(top1, n), "top1_std": fold_std(res.top1[r], folds),
            "top5": top5, "top5_se": binomial_se(top5, n), "top5_std": fold_std(res.top5[r], folds),
            "loss": loss, "nll": loss, "ece": ece(res.conf[r], res.top1[r]) * PERCENT, "n": n,
            "correct": int(res.top1[r].sum()), "correct5": int(res.top5[r].sum())}


def _per_class(res: PerImage, plan: _Plan, n_out: int | None) -> dict:
    n_cls = max(int(n_out or 0), int(res.labels.max()) + 1)
    per_n = np.bincount(res.labels, minlength=n_cls)
    names = list(plan.class_names) if plan.class_names is not None and len(plan.class_names) >= n_cls else None
    acc = {key: [None if per_n[c] == 0 else float(v) for c, v in
                 enumerate(np.bincount(res.labels, weights=res.top1[r].astype(np.float64), minlength=n_cls)
                           * PERCENT / np.maximum(per_n, 1))]
           for r, key in enumerate(plan.row_keys)}
    return {"classes": names[:n_cls] if names else [str(c) for c in range(n_cls)], "n": per_n.tolist(), "top1": acc}


def evaluate(model: nn.Module, samples, cfg: DataConfig, *, test_sizes: Sequence[int],
             crop_ratios: Sequence[float] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             env: fdist.DistEnv | None = None, precision: Precision | None = None, workers: int | None = None,
             ensembles: Sequence[Sequence] = (), ten_crop: bool = False, folds: int = DEFAULT_FOLDS,
             progress: bool = True, num_classes: int | None = None, class_names: Sequence[str] | None = None,
             per_class: bool = True, keep_log_probs: bool = False, keep_outcomes: bool = False,
             reduced_decode: bool = True, corrupt: Callable | None = None, record=None) -> EvalResult:
    """Evaluate ``model`` on ``samples`` at every (test_size, crop_ratio) pair in one pass.

    ``samples``: a ``FolderIndex`` or a list of (path, label) (streamed shards: ``fixres.method.streaming``).
    ``crop_ratios`` defaults to the data config's. ``ensembles``: e.g. ``[(384, 352)]``, averaged softmax over
    those sizes (their views are added if not requested). ``ten_crop``: each view is the average softmax of 10 crops.
    ``num_classes``: the data set's number of classes; it must equal the model's outputs.

    Returns an ``EvalResult`` (``fixres.io.evaluation``): ``rows`` (a ``ViewScore`` per view: top-1 with its binomial
    standard error, the error bar, and its fold std, the leave-one-fold-out std of section 5; top-5, loss = NLL, ECE
    in percent over 15 bins of top-1 confidence, ``fixres.method.calibration``; n, correct), ``ensembles``,
    ``n_images``, ``skipped``, ``reliability`` (per view: reliability-diagram bins), ``per_class``, timing.
    Accuracies are in percent. The model is moved to the evaluation device (channels_last when the precision says so)
    and returned to its previous train/eval mode. ``precision`` defaults to ``inference_precision``; ``workers`` to
    ``data.default_workers``. ``keep_log_probs``: also keep ``arrays.log_probs`` ({view: array (images, classes)},
    data-set order) and ``arrays.labels``, e.g. for ``calibration.fit_temperature``. ``keep_outcomes``: also keep
    ``arrays.hits`` ({view: bool array}) and ``arrays.idx`` (each image's index in ``samples``), data-set order,
    skipped images left out: for paired per-image comparisons. The arrays are never written.
    ``reduced_decode``: decode JPEGs only as large as each view needs (``data.ImageDataset``); a view's numbers are
    the same whether it is evaluated alone or in a sweep. ``corrupt``: ``corrupt(photo, i)`` on each full-size photo.
    ``record``: a recorder of the activations entering a cut point (``fixres.method.cutcache.CutRecorder``), filled
    during the pass; one process, single crops.
    """
    env = env or fdist.DistEnv()
    precision = precision or inference_precision(env.device)
    if isinstance(samples, ShardStream):
        raise UsageError("streamed shards are read once, front to back: evaluate them with "
                         "fixres.method.streaming.evaluate_stream")
    plan = _plan(model, samples, cfg, test_sizes=test_sizes, crop_ratios=crop_ratios, ensembles=ensembles,
                 batch_size=batch_size, folds=folds, num_classes=num_classes, class_names=class_names)
    workers = default_workers(env.world_size) if workers is None else workers
    shard = fdist.shard_indices(len(plan.samples), env.rank, env.world_size)
    loader = _loader(plan, cfg, shard, ten_crop=ten_crop, batch_size=batch_size, workers=workers, env=env,
                     reduced_decode=reduced_decode, corrupt=corrupt)
    if record is not None and (env.distributed or ten_crop):
        raise UsageError("evaluate: activations are recorded in one process, on single crops")
    res, counts, skipped, n_out, fallbacks, seconds = _one_pass(
        model, plan, loader, total=len(shard), ten_crop=ten_crop, env=env, precision=precision, progress=progress,
        keep_log_probs=keep_log_probs, record=record)
    _check_coverage(res, counts, skipped, len(plan.samples))
    return assemble(res, plan, [{"path": p, "reason": why} for _, p, why in skipped], n_out=n_out,
                    fallbacks=fdist.all_reduce_sum_int(fallbacks, env), seconds=seconds, env=env, precision=precision,
                    batch_size=batch_size, workers=workers, ten_crop=ten_crop, folds=folds, per_class=per_class,
                    keep_log_probs=keep_log_probs, keep_outcomes=keep_outcomes)


def assemble(res: PerImage, plan: _Plan, skipped: list[dict], *, n_out: int | None, fallbacks: int, seconds: float,
             env: fdist.DistEnv, precision: Precision, batch_size: int, workers: int, ten_crop: bool, folds: int,
             per_class: bool, keep_log_probs: bool, keep_outcomes: bool) -> EvalResult:
    """The ``EvalResult`` of per-image outcomes in data-set order (from a pass over the photos, or from the
    activations at a cut, ``fixres.method.cutcache``): the rows, their reliability, per-class top-1, the arrays."""
    n = int(res.idx.size)
    rows, ens_rows = _rows(res, plan, ten_crop=ten_crop, folds=folds)
    result = {
        "rows": rows, "ensembles": ens_rows, "n_images": n, "n_samples": len(plan.samples),
        "skipped": skipped, "folds": folds, "num_outputs": n_out,
        "precision": precision.describe(), "fp32_fallback_batches": fallbacks,
        "device": str(env.device), "world_size": env.world_size, "backend": env.backend,
        "batch_size": batch_size, "workers": workers, "seconds": seconds,
        "images_per_s": (n + len(skipped)) / seconds if seconds > 0 else float("nan"),
        "reliability": {key: reliability(res.conf[r], res.top1[r]) for r, key in enumerate(plan.row_keys)},
    }
    if per_class:
        result["per_class"] = _per_class(res, plan, n_out)
    return parse(EvalResult, result,
                 arrays=_photo_arrays(res, plan, keep_log_probs=keep_log_probs, keep_outcomes=keep_outcomes))


def _loader(plan: _Plan, cfg: DataConfig, shard: Sequence[int], *, ten_crop: bool, batch_size: int, workers: int,
            env: fdist.DistEnv, reduced_decode: bool, corrupt: Callable | None):
    """This rank's loader over its ``shard``: every view of a photo from one decode per JPEG reduction it needs."""
    return make_loader(ImageDataset(plan.samples, views_transform(plan, cfg, ten_crop=ten_crop, workers=workers),
                                    reduced_decode=reduced_decode and corrupt is None, corrupt=corrupt),
                       batch_size=batch_size, sampler=IndexSampler(shard), workers=workers,
                       pin_memory=pin_memory_for(env.device))


def views_transform(plan: _Plan, cfg: DataConfig, *, ten_crop: bool, workers: int) -> Callable:
    """Every view of ``plan`` from one photo (``transforms.MultiView``); single-threaded when it runs in the main
    process."""
    build = ten_crop_transform if ten_crop else test_transform
    transform = MultiView([build(geometry_for(v.test_size, cfg, v.crop_ratio), cfg) for v in plan.views])
    return SingleThreaded(transform) if workers == 0 else transform


def _one_pass(model: nn.Module, plan: _Plan, loader, *, total: int, ten_crop: bool, env: fdist.DistEnv,
              precision: Precision, progress: bool, keep_log_probs: bool, record=None):
    """The pass itself, timed: the model prepared for the device (and put back in its train/eval mode after),
    every rank over its shard, then every rank's outcomes gathered (``_gathered``).

    Returns (per-image outcomes, counts, skipped, number of outputs, fp32 retries, seconds)."""
    was_training = model.training
    model = prepare(model, env.device, precision)
    model.eval()
    start = time.perf_counter()
    # Batch norms folded into their convolutions (a copy; the same function, fewer layers to run); the modules
    # after a recorded cut are kept, so the activation entering the cut is the unfolded model's.
    folded = fold_batchnorms(model, plan.views[0].test_size, keep=record.keep if record is not None else ())[0]
    at = modules_at_sizes(folded, [v.test_size for v in plan.views])
    models = [at[v.test_size] for v in plan.views]
    try:
        with record.attached(models) if record is not None else contextlib.nullcontext():
            local, skipped_local, n_out, fallbacks = _run_local(
                models, loader, plan, total=total, ten_crop=ten_crop, env=env, precision=precision,
                progress=progress, keep_log_probs=keep_log_probs, record=record)
    finally:
        model.train(was_training)
    res, counts, skipped = _gathered(local, skipped_local, env, len(plan.views) + len(plan.ens_views))
    return res, counts, skipped, n_out, fallbacks, time.perf_counter() - start


def _gathered(local: PerImage, skipped_local: list, env: fdist.DistEnv, n_rows: int):
    """Exact integer counts summed over ranks, the per-image outcomes back in data-set order, and the skipped
    files of every rank in data-set order: (outcomes, counts, skipped)."""
    counts = fdist.all_reduce_sum(torch.tensor(
        [[local.idx.size, int(local.top1[r].sum()), int(local.top5[r].sum())] for r in range(n_rows)]
        + [[len(skipped_local), 0, 0]], dtype=torch.int64), env)
    res = gather_in_order(local, env, n_rows)
    skipped = sorted((s for g in fdist.all_gather_objects(skipped_local, env) for s in g), key=lambda s: s[0])
    return res, counts, skipped


def _rows(res: PerImage, plan: _Plan, *, ten_crop: bool, folds: int) -> tuple[list[dict], list[dict]]:
    """The result rows: one per view, one per ensemble (``_summary``)."""
    rows = [{"test_size": v.test_size, "crop_ratio": v.crop_ratio, "resize": v.resize, "ten_crop": ten_crop,
             **_summary(res, i, folds)} for i, v in enumerate(plan.views)]
    ens_rows = [{"test_sizes": [v.test_size for v in m], "crop_ratios": [v.crop_ratio for v in m],
                 "ten_crop": ten_crop, **_summary(res, len(plan.views) + j, folds)}
                for j, m in enumerate(plan.ens_views)]
    return rows, ens_rows


def _photo_arrays(res: PerImage, plan: _Plan, *, keep_log_probs: bool, keep_outcomes: bool) -> PhotoArrays:
    """The per-photo arrays a caller asked for (kept in memory, never written)."""
    return PhotoArrays(
        idx=res.idx.copy() if keep_outcomes else None,
        hits={key: res.top1[r].copy() for r, key in enumerate(plan.row_keys)} if keep_outcomes else None,
        log_probs=dict(zip(plan.row_keys, res.log_probs or [])) if keep_log_probs else None,
        labels=res.labels if keep_log_probs else None)


def temperature_scale(result: EvalResult, held_out: EvalResult) -> EvalResult:
    """Temperature scaling of every row of ``result``, each fitted on the same row of ``held_out``.

    Both are ``evaluate(..., keep_log_probs=True)`` results with the same views: ``held_out`` on labelled
    images the reported numbers do not use (e.g. a held-out part of the training data). Each row and ensemble
    row of the returned result gains ``temperature`` (``calibration.fit_temperature``), and the NLL and ECE
    (percent) after dividing the logits by it, ``nll_scaled`` and ``ece_scaled``. Top-1 is unchanged by
    construction (the order of the logits is kept).
    """
    for res, name in ((result, "result"), (held_out, "held_out")):
        if res.arrays.log_probs is None:
            raise UsageError(f"temperature_scale: {name} was evaluated without keep_log_probs=True")
    labels = torch.from_numpy(result.arrays.labels)
    held_labels = torch.from_numpy(held_out.arrays.labels)
    scaled_rows = []
    for row in result.rows + result.ensembles:
        key = row.label
        if key not in held_out.arrays.log_probs:
            raise UsageError(f"temperature_scale: the held-out result has no view {key}")
        t = fit_temperature(torch.from_numpy(held_out.arrays.log_probs[key]), held_labels)
        scaled = torch.log_softmax(apply_temperature(torch.from_numpy(result.arrays.log_probs[key]).double(), t), 1)
        hit = _scores(scaled, labels, 1)[0]
        scaled_rows.append(replace(row, temperature=t, nll_scaled=nll(scaled, labels),
                                   ece_scaled=ece(scaled.max(1).values.exp().numpy(), hit) * PERCENT))
    n = len(result.rows)
    return result.with_rows(scaled_rows[:n], scaled_rows[n:], temperature_fitted_on=FittedOn(held_out.n_images))
