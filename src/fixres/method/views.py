"""What one evaluation pass is asked for: its views, ensembles and samples, checked before any image is read.

A view is one way of showing a photo to the network: a centre crop of ``test_size`` at ``crop_ratio``
(``View``). ``_plan`` validates a request (sizes, crop ratios, ensembles of two or more views, the batch size
and folds, the samples) and checks the data's classes against the model's outputs, so a mismatch is an error
naming the fix before ``fixres.method.evaluate`` decodes anything; views an ensemble needs are added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from fixres.config import DataConfig, validate_crop_ratio, validate_size
from fixres.data.folders import FolderIndex
from fixres.data.transforms import resize_for
from fixres.errors import UsageError
from fixres.models.loading import num_outputs


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
        return int(num_outputs(model))
    except Exception:  # noqa: BLE001 - models without a findable head: checked on the first batch instead
        return None


@dataclass
class _Plan:
    """What ``evaluate`` was asked for, validated: the samples, the views and ensembles, the class count."""

    samples: list
    views: list[View]
    ens_views: list[tuple[View, ...]]
    class_names: Sequence[str] | None
    num_classes: int | None
    max_label: int

    @property
    def row_keys(self) -> list[str]:
        return [v.key for v in self.views] + ["+".join(v.key for v in m) for m in self.ens_views]


def _plan(model: nn.Module, samples, cfg: DataConfig, *, test_sizes, crop_ratios, ensembles, batch_size: int,
          folds: int, num_classes: int | None, class_names) -> _Plan:
    views, ens_views = _request(cfg, test_sizes=test_sizes, crop_ratios=crop_ratios, ensembles=ensembles,
                                batch_size=batch_size, folds=folds)
    if isinstance(samples, FolderIndex):
        class_names = class_names or samples.classes
        samples = samples.samples
    samples = list(samples)
    if not samples:
        raise UsageError("no images to evaluate")
    max_label = max(label for _, label in samples)
    _check_classes(_model_outputs(model), num_classes, max_label)
    return _Plan(samples, views, ens_views, class_names, num_classes, max_label)


def _request(cfg: DataConfig, *, test_sizes, crop_ratios, ensembles, batch_size: int,
             folds: int) -> tuple[list[View], list[tuple[View, ...]]]:
    """The views and ensembles asked for, checked, with the views each ensemble needs added."""
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    if folds < 2:
        raise UsageError(f"folds must be at least 2, got {folds}")
    test_sizes = list(test_sizes)
    if not test_sizes:
        raise UsageError("no test size given")
    crop_ratios = [cfg.crop_ratio] if not crop_ratios else list(crop_ratios)
    views = _views(test_sizes, crop_ratios)
    ens_views = _ensemble_views(ensembles, float(crop_ratios[0]))
    for members in ens_views:
        views.extend(v for v in members if v not in views)
    return views, ens_views


def _check_classes(n_out: int | None, num_classes: int | None, max_label: int) -> None:
    if n_out is None:
        return
    if num_classes is not None and num_classes != n_out:
        raise _class_mismatch(num_classes, n_out)
    if max_label >= n_out:
        raise _class_mismatch(max_label + 1, n_out)
