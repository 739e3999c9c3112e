"""Evaluation at any test resolution: one pass over the data, exact counts, error bars (paper section 5).

``evaluate`` decodes each image once and feeds every requested view, one per (test_size,
crop_ratio) pair (``transforms.MultiView``), to the model; so a sweep of K sizes costs one decode
per image instead of K. For every view it reports top-1, top-5, mean cross-entropy and per-class
top-1, plus multi-resolution ensembles (averaged softmax over sizes, section 5.1) and optional
10-crop testing. Significance follows section 5: the images are split into ``folds`` folds,
accuracy is measured on all folds but one, leaving each out in turn, and the standard deviation of
those accuracies is reported next to every figure (``fold_std``).

Counts are exact under torchrun: each rank takes a strided shard of the data set (no padding, no
duplicates), counts are summed with ``all_reduce_sum`` and the per-image outcomes are gathered
(``all_gather_objects``) and put back in data-set order, so fold std, loss and per-class numbers
of K processes are those of a single process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fixres import dist as fdist
from fixres.config import DEFAULT_FOLDS, DataConfig, validate_crop_ratio, validate_size
from fixres.data import FolderIndex, ImageDataset, IndexSampler, default_workers, make_loader
from fixres.engine import (Precision, SingleThreaded, autocast, inference_precision, prepare,
                           to_device)
from fixres.errors import FixresError, UsageError
from fixres.progress import bar
from fixres.transforms import MultiView, resize_for, ten_crop_transform, test_transform

#: Section 5: the validation images are split into 10 folds for the leave-one-fold-out std.
DEFAULT_BATCH_SIZE = 64
#: top-5 is the paper's second metric; with fewer classes it degrades to top-K with K = classes.
TOP5 = 5
PERCENT = 100.0


@dataclass(frozen=True)
class View:
    """One way of showing an image to the network: a centre crop of ``test_size`` at ``crop_ratio``."""

    test_size: int
    crop_ratio: float

    @property
    def key(self) -> str:
        return f"{self.test_size}@{self.crop_ratio:g}"

    @property
    def resize(self) -> int:
        return resize_for(self.test_size, self.crop_ratio)


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



def _views(test_sizes: Iterable[int], crop_ratios: Iterable[float]) -> list[View]:
    out: list[View] = []
    for size in test_sizes:
        validate_size(int(size), "test_size")
        for ratio in crop_ratios:
            v = View(int(size), float(validate_crop_ratio(ratio)))
            if v not in out:
                out.append(v)
    return out


def _ensemble_views(ensembles, default_ratio: float) -> list[tuple[View, ...]]:
    """Ensembles as tuples of views: each member is a test size (at the first crop ratio) or a (size, ratio) pair."""
    out = []
    for ens in ensembles or ():
        members = []
        for m in ens:
            v = View(int(m[0]), float(m[1])) if isinstance(m, (tuple, list)) else View(int(m), default_ratio)
            validate_size(v.test_size, "ensemble test_size")
            validate_crop_ratio(v.crop_ratio)
            if v not in members:
                members.append(v)
        if len(members) < 2:
            raise UsageError(f"an ensemble needs at least two different test sizes, got {list(ens)}")
        out.append(tuple(members))
    return out


def _class_mismatch(n_data: int, n_model: int) -> UsageError:
    return UsageError(f"the data has {n_data} classes but the model outputs {n_model}; pass --num-classes "
                      f"{n_data} to give the model a new head (then fine-tune it), or --class-map FILE to map the "
                      "folders onto the model's classes")


def _model_outputs(model: nn.Module) -> int | None:
    try:
        from fixres.models import num_outputs
        return int(num_outputs(model))
    except Exception:  # noqa: BLE001 - models without a findable head: checked on the first batch instead
        return None


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


def evaluate(model: nn.Module, samples, cfg: DataConfig, *, test_sizes: Sequence[int],
             crop_ratios: Sequence[float] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             env: fdist.DistEnv | None = None, precision: Precision | None = None, workers: int | None = None,
             ensembles: Sequence[Sequence] = (), ten_crop: bool = False, folds: int = DEFAULT_FOLDS,
             progress: bool = True, num_classes: int | None = None, class_names: Sequence[str] | None = None,
             per_class: bool = True) -> dict:
    """Evaluate ``model`` on ``samples`` at every (test_size, crop_ratio) pair in one pass.

    ``samples``: a ``FolderIndex`` or a list of (path, label). ``crop_ratios`` defaults to the data
    config's. ``ensembles``: e.g. ``[(384, 352)]``, averaged softmax over those sizes (their views
    are added if not requested). ``ten_crop``: each view is the average softmax of 10 crops.
    ``num_classes``: the data set's number of classes; it must equal the model's outputs.

    Returns a JSON-ready dict: ``rows`` (one per view: test_size, crop_ratio, resize, top1, top1_std,
    top5, top5_std, loss, n, correct, correct5), ``ensembles``, ``n_images``, ``skipped`` ([{path,
    reason}]), ``per_class`` (classes, count per class, top-1 per class for each view), timing.
    Accuracies are in percent. The model is moved to the evaluation device (channels_last when the
    precision says so) and returned to its previous train/eval mode. ``precision`` defaults to
    ``inference_precision``; ``workers`` to ``data.default_workers``.
    """
    env = env or fdist.DistEnv()
    precision = precision or inference_precision(env.device)
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    if folds < 2:
        raise UsageError(f"folds must be at least 2, got {folds}")
    if isinstance(samples, FolderIndex):
        class_names = class_names or samples.classes
        samples = samples.samples
    samples = list(samples)
    if not samples:
        raise UsageError("no images to evaluate")
    test_sizes = list(test_sizes)
    if not test_sizes:
        raise UsageError("no test size given")
    crop_ratios = [cfg.crop_ratio] if not crop_ratios else list(crop_ratios)
    views = _views(test_sizes, crop_ratios)
    ens_views = _ensemble_views(ensembles, float(crop_ratios[0]))
    for members in ens_views:
        views.extend(v for v in members if v not in views)
    pos = {v: i for i, v in enumerate(views)}

    n_model = _model_outputs(model)
    if num_classes is not None and n_model is not None and num_classes != n_model:
        raise _class_mismatch(num_classes, n_model)
    max_label = max(label for _, label in samples)
    if n_model is not None and max_label >= n_model:
        raise _class_mismatch(max_label + 1, n_model)

    build = ten_crop_transform if ten_crop else test_transform
    transform = MultiView([build(test_size=v.test_size, crop_ratio=v.crop_ratio, cfg=cfg) for v in views])
    workers = default_workers(env.world_size) if workers is None else workers
    if workers == 0:
        transform = SingleThreaded(transform)
    shard = fdist.shard_indices(len(samples), env.rank, env.world_size)
    loader = make_loader(ImageDataset(samples, transform), batch_size=batch_size, sampler=IndexSampler(shard),
                         workers=workers)

    was_training = model.training
    model = prepare(model, env.device, precision)
    model.eval()

    n_views, n_ens = len(views), len(ens_views)
    idx_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    top1_parts: list[np.ndarray] = []   # (n_views + n_ens, batch) per batch
    top5_parts: list[np.ndarray] = []
    loss_parts: list[np.ndarray] = []
    skipped_local: list[tuple[int, str, str]] = []
    n_out: int | None = None
    fallbacks = 0
    start = time.perf_counter()
    pbar = bar(len(shard), f"eval {len(views)} view{'s' if len(views) > 1 else ''}",
               enabled=progress and env.is_main)
    with pbar, torch.inference_mode():
        for batch in loader:
            skipped_local.extend((s.index, s.path, s.reason) for s in batch.skipped)
            if batch.inputs is None:
                pbar.update(len(batch.skipped))
                continue
            inputs = batch.inputs if isinstance(batch.inputs, tuple) else (batch.inputs,)
            labels = batch.labels
            b = len(labels)
            logps: list[torch.Tensor] = []
            for x in inputs:
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
                    logp = torch.log_softmax(logits, 1).reshape(b, -1, logits.shape[1]).logsumexp(1) - math.log(
                        logits.shape[0] // b)
                else:
                    logp = torch.log_softmax(logits, 1)
                logps.append(logp)
            if n_out is None:
                n_out = logps[0].shape[1]
                if num_classes is not None and num_classes != n_out:
                    raise _class_mismatch(num_classes, n_out)
                if max_label >= n_out:
                    raise _class_mismatch(max_label + 1, n_out)
            k5 = min(TOP5, n_out)
            for members in ens_views:
                # Section 5.1: classify at several resolutions and average the class probabilities.
                stacked = torch.stack([logps[pos[v]] for v in members])
                logps.append(stacked.logsumexp(0) - math.log(len(members)))
            scores = [_scores(lp, labels, k5) for lp in logps]
            idx_parts.append(batch.indices.numpy().astype(np.int64))
            label_parts.append(labels.numpy().astype(np.int64))
            top1_parts.append(np.stack([s[0] for s in scores]))
            top5_parts.append(np.stack([s[1] for s in scores]))
            loss_parts.append(np.stack([s[2] for s in scores]))
            pbar.update(b + len(batch.skipped))
    if was_training:
        model.train()

    n_rows = n_views + n_ens
    idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    labels_np = np.concatenate(label_parts) if label_parts else np.zeros(0, np.int64)
    top1 = np.concatenate(top1_parts, axis=1) if top1_parts else np.zeros((n_rows, 0), bool)
    top5 = np.concatenate(top5_parts, axis=1) if top5_parts else np.zeros((n_rows, 0), bool)
    loss = np.concatenate(loss_parts, axis=1) if loss_parts else np.zeros((n_rows, 0), np.float64)

    # Exact integer counts summed over ranks ...
    counts = torch.tensor([[idx.size, int(top1[r].sum()), int(top5[r].sum())] for r in range(n_rows)]
                          + [[len(skipped_local), 0, 0]], dtype=torch.int64)
    counts = fdist.all_reduce_sum(counts, env)
    # ... and the per-image outcomes, back in data-set order, for fold std, loss and per-class numbers.
    gathered = fdist.all_gather_objects((idx, labels_np, top1, top5, loss, skipped_local), env)
    idx = np.concatenate([g[0] for g in gathered])
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    labels_np = np.concatenate([g[1] for g in gathered])[order]
    top1 = np.concatenate([g[2] for g in gathered], axis=1)[:, order]
    top5 = np.concatenate([g[3] for g in gathered], axis=1)[:, order]
    loss = np.concatenate([g[4] for g in gathered], axis=1)[:, order]
    skipped = sorted((s for g in gathered for s in g[5]), key=lambda s: s[0])
    seconds = time.perf_counter() - start

    n = int(idx.size)
    if np.unique(idx).size != n or n + len(skipped) != len(samples):
        raise FixresError(f"internal error: ranks covered {n} + {len(skipped)} skipped of {len(samples)} images")
    if int(counts[-1, 0]) != len(skipped) or any(int(counts[r, 0]) != n or int(counts[r, 1]) != int(top1[r].sum())
                                                 or int(counts[r, 2]) != int(top5[r].sum()) for r in range(n_rows)):
        raise FixresError("internal error: reduced counts differ from the gathered per-image results")
    if n == 0:
        first = f" (first: {skipped[0][1]}: {skipped[0][2]})" if skipped else ""
        raise UsageError(f"no image could be read: all {len(skipped)} were skipped{first}")

    def summary(r: int) -> dict:
        return {
            "top1": float(top1[r].sum()) * PERCENT / n, "top1_std": fold_std(top1[r], folds),
            "top5": float(top5[r].sum()) * PERCENT / n, "top5_std": fold_std(top5[r], folds),
            "loss": float(loss[r].sum() / n), "n": n,
            "correct": int(counts[r, 1]), "correct5": int(counts[r, 2]),
        }

    rows = [{"test_size": v.test_size, "crop_ratio": v.crop_ratio, "resize": v.resize, "ten_crop": ten_crop,
             **summary(i)} for i, v in enumerate(views)]
    ens_rows = [{"test_sizes": [v.test_size for v in members], "crop_ratios": [v.crop_ratio for v in members],
                 "ten_crop": ten_crop, **summary(n_views + j)} for j, members in enumerate(ens_views)]
    result = {
        "rows": rows,
        "ensembles": ens_rows,
        "n_images": n,
        "n_samples": len(samples),
        "skipped": [{"path": p, "reason": why} for _, p, why in skipped],
        "folds": folds,
        "num_outputs": n_out,
        "precision": precision.describe(),
        "fp32_fallback_batches": int(all_reduce_sum_int(fallbacks, env)),
        "device": str(env.device),
        "world_size": env.world_size, "backend": env.backend,
        "batch_size": batch_size,
        "workers": workers,
        "seconds": seconds,
        "images_per_s": (n + len(skipped)) / seconds if seconds > 0 else float("nan"),
    }
    if per_class:
        n_cls = max(int(n_out or 0), int(labels_np.max()) + 1)
        per_n = np.bincount(labels_np, minlength=n_cls)
        names = list(class_names) if class_names is not None and len(class_names) >= n_cls else None
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = {
                key: [None if per_n[c] == 0 else float(v) for c, v in
                      enumerate(np.bincount(labels_np, weights=top1[r].astype(np.float64), minlength=n_cls)
                                * PERCENT / np.maximum(per_n, 1))]
                for r, key in enumerate([v.key for v in views] + ["+".join(v.key for v in m) for m in ens_views])
            }
        result["per_class"] = {"classes": names[:n_cls] if names else [str(c) for c in range(n_cls)],
                               "n": per_n.tolist(), "top1": acc}
    return result


def all_reduce_sum_int(value: int, env: fdist.DistEnv) -> int:
    return int(fdist.all_reduce_sum(torch.tensor([value], dtype=torch.int64), env)[0])


def row_label(row: dict) -> str:
    """Short label of a result row: '224@0.875', or '384+352' for an ensemble."""
    if "test_sizes" in row:
        return "+".join(str(s) for s in row["test_sizes"])
    return f"{row['test_size']}@{row['crop_ratio']:g}"
