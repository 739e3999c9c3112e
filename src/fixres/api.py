"""The Python API: FixRes as functions on a plain ``nn.Module`` (or a model name / checkpoint) and a folder
(or an ImageFolder-like ``Dataset``), returning typed results.

The CLI is a thin layer over the same library functions; this module adds no method of its own. It
turns the inputs people hold in a notebook into what the library takes (a ``ModelBundle`` with its
data config, a ``FolderIndex``) and returns the library's own result types (``fixres.io.evaluation``,
``fixres.io.results``); ``to_json()`` gives the JSON a command would write.

    >>> import fixres
    >>> fixres.analyze(train_size=224).recommended_test_size
    288
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence, Union

from torch import nn

from fixres.choosing.best import best_row
from fixres.config import DEFAULT_BATCH_SIZE, DEFAULT_FINETUNE_EPOCHS, DEFAULT_PARTS, DataConfig, default_out
from fixres.data import folders as _data
from fixres.data import given as _given
from fixres.data import hfsets as _hfsets
from fixres.errors import UsageError
from fixres.io.evaluation import EvalResult, ViewScore
from fixres.io.results import AnalysisDocument
from fixres.io.run import FixRun
from fixres.io.schema import parse
from fixres.io.served import UNTUNED
from fixres.job import pipeline as _pipeline
from fixres.method import adaptation as _adapt
from fixres.method import analysis as _analysis
from fixres.method import evaluate as _evaluate
from fixres.method import finetuning as _finetune
from fixres.method.inputs import index_split
from fixres.models import export as _export
from fixres.models.loading import LITE_WEIGHTS, ModelBundle, ModelSpec, data_config_for
from fixres.models.timmcfg import model_pretrained_view
from fixres.runtime.dist import DistEnv, resolve_device
from fixres.runtime.engine import inference_precision, precision_for

#: What the functions accept as a model: a module (its data config guessed from timm's metadata unless
#: given), a bundle from ``fixres.load``, or a string: a checkpoint / export path, or a timm/torchvision name.
ModelLike = Union[nn.Module, ModelBundle, str, Path]
#: What they accept as data: an ImageFolder root (or a root with train/ and val/), a ``FolderIndex``,
#: (path, label) pairs, or a Dataset exposing ``.samples`` and ``.classes`` (torchvision's ImageFolder).
DataLike = Union[str, Path, "_data.FolderIndex", Sequence, Any]


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Analysis:
    """Apparent object size at test time relative to training (eq. 5), and the test size it implies; with photo
    sizes, the ratio sampled on them (``sampled_ratio``, Monte Carlo)."""

    train_size: int
    crop_ratio: float
    ratio: float
    recommended_test_size: int
    recommended_test_size_exact: float
    sampled_ratio: float | None = None


@dataclass(frozen=True, repr=False)
class SizeResult(ViewScore):
    """Accuracy at one test size, in percent (``fixres.io.evaluation.ViewScore``): ``top1_se`` is the error bar,
    the binomial standard error of ``top1`` on ``n`` images; ``top1_std`` is the fold std, the leave-one-fold-out
    std of the paper's section 5, a fraction of the sampling noise."""

    @classmethod
    def of(cls, row: ViewScore) -> "SizeResult":
        """``row`` with its error bar filled in where the row lacks it."""
        return cls(**{**{f.name: getattr(row, f.name) for f in fields(ViewScore)}, "top1_se": row.se})

    @classmethod
    def from_row(cls, row: dict) -> "SizeResult":
        """A row as a command writes it (``eval.json``, ``sweep.json``)."""
        return cls.of(parse(ViewScore, row))


@dataclass(frozen=True)
class SweepResult(EvalResult):
    """Every test size measured in one pass over the images (``fixres.io.evaluation.EvalResult``), with the train
    size the best size's ties are broken toward."""

    train_size: int | None = None

    @property
    def best(self) -> SizeResult:
        """The most accurate size, by the project's one rule (``fixres.choosing.best.best_row``: ties go to
        the size closest to the train size, then to the smaller one)."""
        return best_row(self.rows, train_size=self.train_size)

    def at(self, test_size: int) -> SizeResult:
        row = super().at(test_size)
        if row is None:
            raise KeyError(f"{test_size} was not measured (sizes: {', '.join(str(r.test_size) for r in self.rows)})")
        return row

    def __repr__(self) -> str:
        curve = ", ".join(f"{r.test_size}px {r.top1:.1f}" for r in self.rows)
        return f"SweepResult({curve}; best {self.best.test_size}px; {self.n_images} images)"


@dataclass(frozen=True)
class AdaptResult:
    """A model adapted to ``test_size`` (in place), with its accuracy before and after where measured."""

    model: nn.Module
    test_size: int
    method: str
    before: SizeResult | None
    after: SizeResult | None
    #: the photos a label-free adaptation read (None for a fine-tuning)
    images: int | None = None

    def __repr__(self) -> str:
        change = (f": top-1 {self.before.top1:.1f} -> {self.after.top1:.1f}" if self.before and self.after else "")
        return f"AdaptResult({self.method} at {self.test_size}px{change})"


@dataclass(frozen=True)
class FixResult(FixRun):
    """What ``fixres fix`` produced (``fixres.io.results.FixRun``: what is served at which size and why, the
    headline, where the files are, every step's result), with the fixed model loaded on demand."""

    @functools.cached_property
    def bundle(self) -> ModelBundle:
        """The fixed model with its pre-processing, loaded from the export once."""
        return load(self.export)

    @property
    def model(self):
        """The fixed ``nn.Module`` (eval mode), ready at ``test_size``."""
        return self.bundle.model.eval()

    @property
    def transform(self):
        """Its pre-processing at ``test_size`` as plain torchvision v2 ops."""
        return self.bundle.transform

    def __repr__(self) -> str:
        """What is served, at which size, with the run's unbiased top-1 (cross-selected where it was)."""
        h = self.headline
        top1 = h.top1_served
        how = "served as trained" if h.served_kind == UNTUNED else "fixed"
        shown = f", top-1 {top1:.1f}" if isinstance(top1, (int, float)) else ""
        crossed = " cross-selected" if isinstance(top1, (int, float)) and h.headline_rule else ""
        return f"FixResult({how} at {self.test_size}px{shown}{crossed}, export {self.export})"


# --------------------------------------------------------------------------- inputs

def load(path_or_name: str | Path, *, num_classes: int | None = None, train_size: int | None = None,
         pretrained: bool = False, random_init: bool = False) -> ModelBundle:
    """A model with its data config: an export folder / checkpoint file, registry weights
    (``"efficientnet-lite0"``), or a timm/torchvision name with ``pretrained=True`` (their own weights,
    from the local cache) or ``random_init=True`` (random weights, on purpose: never by default).

    An export (``model.safetensors`` beside ``fixres.json``) carries its test size, crop ratio,
    normalisation and class names.
    """
    path = Path(path_or_name)
    if path.is_dir():
        path = path / _export.WEIGHTS_NAME
    if path.is_file():
        return ModelSpec(checkpoint=str(path), num_classes=num_classes, train_size=train_size).load()
    if any(sep in str(path_or_name) for sep in ("/", "\\")) or path.suffix in (".safetensors", ".pt", ".pth"):
        raise UsageError(f"checkpoint not found: {path_or_name}")
    if str(path_or_name) in LITE_WEIGHTS:
        return ModelSpec(weights=str(path_or_name), num_classes=num_classes, train_size=train_size).load()
    return ModelSpec(model=str(path_or_name), num_classes=num_classes, train_size=train_size, pretrained=pretrained,
                     random_init=random_init).load()


def as_bundle(model: ModelLike, data_config: DataConfig | None = None) -> ModelBundle:
    """Wrap what the caller holds as a ``ModelBundle``; ``data_config`` (if given) wins over the model's own."""
    if isinstance(model, ModelBundle):
        bundle = model
    elif isinstance(model, nn.Module):
        source = "timm" if getattr(model, "pretrained_cfg", None) else "module"
        name = model_pretrained_view(model).architecture or type(model).__name__.lower()
        bundle = ModelBundle(model, data_config_for(model, source), name, source, {})
    elif isinstance(model, (str, Path)):
        bundle = load(model)
    else:
        raise TypeError(f"model must be an nn.Module, a ModelBundle, a name or a path, not {type(model).__name__}")
    if data_config is not None:
        bundle = ModelBundle(bundle.model, data_config, bundle.name, bundle.source, dict(bundle.meta))
    return bundle


def as_index(data: DataLike, split: str = "val", *, classes: Sequence[str] | None = None) -> "_data.FolderIndex":
    """The images of ``split`` as a ``FolderIndex``: a folder (its ``split``/ subfolder when it has one),
    an index, (path, label) pairs, or a Dataset with ``.samples`` / ``.classes`` (torchvision ImageFolder); a
    map-style Dataset or any iterable of (PIL image, label) is written once to a temporary folder of lossless
    PNGs (``fixres.data.given``: JPEG's reduced decoding then cannot apply, as no JPEG file is known); a Hugging
    Face ``datasets`` Dataset (or a DatasetDict's ``split``) as its rows' encoded images, so JPEGs stay JPEGs.
    ``classes`` maps a validation folder onto the training classes by name (one rule, ``fixres.data.folders``)."""
    if isinstance(data, _data.FolderIndex):
        return data
    if isinstance(data, (str, Path)):
        return index_split(data, split, classes=list(classes) if classes is not None else None)
    if _hfsets.is_dataset(data):  # its rows' encoded bytes, written as files: a JPEG row is decoded as a JPEG file
        rows, names = _hfsets.encoded_rows(data, split)
        return _given.write_given(rows, classes=names)
    samples = getattr(data, "samples", None)
    try:
        if samples is None:  # pairs, a map-style Dataset or any iterable: of (path, label) or (PIL image, label)
            items = (data[i] for i in range(len(data))) if hasattr(data, "__getitem__") and hasattr(data, "__len__") \
                else iter(data)
            first = next(items, None)
            if isinstance(first, (tuple, list)) and first and not isinstance(first[0], (str, os.PathLike)):
                # images, or anything else write_given names in one line (a tensor: the dataset's transform)
                return _given.write_given(itertools.chain([first], items), classes=getattr(data, "classes", None))
            samples = [] if first is None else itertools.chain([first], items)
        pairs = [(str(p), int(y)) for p, y in samples]
    except (TypeError, ValueError):
        raise TypeError("data must be a folder, a FolderIndex, (path, label) pairs, (PIL image, label) pairs, or a "
                        "Dataset of either or with .samples (such as torchvision's ImageFolder), not "
                        f"{type(data).__name__}") from None
    names = list(getattr(data, "classes", None) or [str(i) for i in range(max((y for _, y in pairs), default=-1) + 1)])
    return _data.FolderIndex(root=Path(getattr(data, "root", ".")), classes=names, samples=pairs, source="given")


def _env(device: str) -> DistEnv:
    return DistEnv(device=resolve_device(device))


# --------------------------------------------------------------------------- the method

def analyze(train_size: int, *, crop_ratio: float | None = None, stride: int | None = None,
            image_sizes: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> Analysis:
    """Apparent object size ratio (closed form; Monte Carlo over ``image_sizes`` when given) and the
    test size it recommends, rounded to the network stride (appendix B)."""
    defaults = DataConfig(train_size=train_size)
    found = _analysis.analyze(train_size=train_size, crop_ratio=crop_ratio or defaults.crop_ratio,
                              stride=stride or defaults.stride, image_sizes=image_sizes, seed=seed)
    doc = parse(AnalysisDocument, found)
    return Analysis(train_size=train_size, crop_ratio=doc.crop_ratio, ratio=doc.ratio,
                    recommended_test_size=doc.recommended_test_size,
                    recommended_test_size_exact=doc.recommended_test_size_exact,
                    sampled_ratio=doc.monte_carlo.mean if doc.monte_carlo else None)


def sweep(model: ModelLike, data: DataLike, test_sizes: Sequence[int], *, data_config: DataConfig | None = None,
          crop_ratio: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
          amp: bool = True, workers: int | None = 0, progress: bool = False) -> SweepResult:
    """Top-1 (± binomial standard error; the fold std too), top-5 and loss at every test size, in one pass over
    the images."""
    bundle = as_bundle(model, data_config)
    index = as_index(data, "val", classes=bundle.data_config.class_names)
    env = _env(device)
    result = _evaluate.evaluate(bundle.model, index, bundle.data_config, test_sizes=list(test_sizes),
                                crop_ratios=[crop_ratio] if crop_ratio else None, batch_size=batch_size, env=env,
                                precision=inference_precision(env.device, amp), workers=workers, progress=progress)
    values = {f.name: getattr(result, f.name) for f in fields(EvalResult)}
    return SweepResult(**{**values, "rows": tuple(SizeResult.of(r) for r in result.rows),
                          "ensembles": tuple(SizeResult.of(r) for r in result.ensembles)},
                       train_size=bundle.data_config.train_size)


def finetune(model: ModelLike, data: DataLike, test_size: int, *, parts: str | Sequence[str] = DEFAULT_PARTS,
             val: DataLike | None = None, data_config: DataConfig | None = None, epochs: int = DEFAULT_FINETUNE_EPOCHS,
             lr: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, augment: str = "test",
             out_dir: str | Path | None = None, device: str = "auto", amp: bool = True, workers: int | None = 0,
             seed: int = 0, progress: bool = False) -> AdaptResult:
    """Fine-tune ``parts`` of the model (in place) at ``test_size`` on the training images of ``data``
    (its ``train/`` folder when it has one) and measure top-1 on ``val`` (default: ``data``'s ``val/``)."""
    bundle = as_bundle(model, data_config)
    train_index = as_index(data, "train", classes=bundle.data_config.class_names)
    val_index = as_index(val if val is not None else data, "val", classes=train_index.classes)
    env = _env(device)
    with tempfile.TemporaryDirectory(prefix="fixres-finetune-") as tmp:
        raw = _finetune.finetune(bundle.model, train_index, val_index, bundle.data_config, test_size=test_size,
                                 parts=parts, augment=augment, epochs=epochs, lr=lr, batch_size=batch_size,
                                 out_dir=out_dir or tmp, env=env, precision=precision_for(env.device, amp),
                                 seed=seed, workers=workers, progress=progress)
    return _adapt_result(bundle.model, test_size, "finetune", raw)


def adapt(model: ModelLike, data: DataLike, test_size: int, *, method: str = "bn-recalibrate",
          train_size: int | None = None, data_config: DataConfig | None = None, batch_size: int = 32,
          max_images: int | None = None, device: str = "auto", amp: bool = True, workers: int | None = 0,
          progress: bool = False) -> AdaptResult:
    """Label-free adaptation (in place) from the train size to ``test_size``: ``bn-recalibrate``,
    ``frechet`` (appendix A.1) or ``gaussian`` (A.2). Labels are never read."""
    bundle = as_bundle(model, data_config)
    index = as_index(data, "train")
    env = _env(device)
    raw = _adapt.adapt(bundle.model, index, bundle.data_config, method=method, train_size=train_size,
                       test_size=test_size, batch_size=batch_size, env=env,
                       precision=precision_for(env.device, amp), workers=workers, max_images=max_images,
                       progress=progress)
    return _adapt_result(bundle.model, test_size, method, raw)


def _adapt_result(model: nn.Module, test_size: int, method: str, record: dict) -> AdaptResult:
    """The adaptation's record (its scores before and after, where measured, and its timing) as a result."""
    done = parse(AdaptRecord, record)
    return AdaptResult(model=model, test_size=test_size, method=method,
                       before=done.before and SizeResult.of(replace(done.before,
                                                                    test_size=done.before.test_size or test_size)),
                       after=done.after and SizeResult.of(replace(done.after,
                                                                  test_size=done.after.test_size or test_size)),
                       images=done.images)


@dataclass(frozen=True)
class AdaptRecord:
    """What an adaptation (fine-tuning or label-free) returns that the API surfaces: its scores before and after."""

    before: ViewScore | None = None
    after: ViewScore | None = None
    images: int | None = None


def export(model: ModelLike, path: str | Path, *, test_size: int, data_config: DataConfig | None = None,
           model_name: str | None = None, class_names: Sequence[str] | None = None) -> Path:
    """Write ``path/model.safetensors`` + ``path/fixres.json`` (what ``fixres.load`` and ``fixres eval`` read)."""
    bundle = as_bundle(model, data_config)
    return Path(_export.export_model(bundle.model, path, model_name=model_name or bundle.name, cfg=bundle.data_config,
                                     test_size=test_size, class_names=class_names))


def fix(model: str | None = None, data: str | Path | None = None, *, out: str | Path = default_out("fix"),
        **settings) -> FixResult:
    """The whole method (``fixres fix``): analyze, sweep, fine-tune, statistics, export, report.

    ``model`` is a timm/torchvision name or a checkpoint path; with neither ``model`` nor ``data`` it runs
    the embedded demo. ``settings`` are the fields of ``fixres.job.pipeline.FixConfig`` (``train_size``,
    ``test_sizes``, ``parts``, ``finetune_epochs``, ...).
    """
    if model is not None and Path(model).suffix in (".safetensors", ".pt", ".pth") or (
            model is not None and Path(model).is_dir()):
        settings.setdefault("checkpoint", str(Path(model) / _export.WEIGHTS_NAME if Path(model).is_dir() else model))
    elif model is not None:
        settings.setdefault("model", str(model))
    config = _pipeline.FixConfig(data=None if data is None else str(data), out=str(out), **settings)
    run = _pipeline.run_fix(config)
    return FixResult(**{f.name: getattr(run, f.name) for f in fields(FixRun)})
