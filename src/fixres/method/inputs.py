"""What every command starts from, loaded one way: a model, its data config, the class-mapped splits.

The model comes from a ``fixres.models.loading.ModelSpec`` (its flags); its classes are a given class map,
else an export's own class names when they match its outputs (``class_names_for``); a split is indexed onto
known classes by name, the one class-set rule (``index_folder``, ``index_split``, ``index_train_val``); an
export is evaluated at the size it was fixed for (``ModelBundle.test_size``). ``load_for_adaptation`` puts
them together for fine-tuning, label-free adaptation and statistics; its test size defaults to the one the
apparent-size analysis recommends for the model's train size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from fixres.config import DataConfig
from fixres.data.folders import FolderIndex, missing_classes_warning, shared_photos
from fixres.data.layouts import Location, exists, index_location, resolve_split
from fixres.data.streams import ShardStream, is_stream, open_stream
from fixres.errors import UsageError
from fixres.method.analysis import recommend_test_size
from fixres.models.inputsize import fit_input_size
from fixres.models.loading import ModelBundle, ModelSpec, num_outputs


def class_names_for(bundle: ModelBundle, cfg: DataConfig, class_map: list[str] | None) -> list[str] | None:
    """The classes a data folder maps onto: the given class map, else a fixres export's own class names when
    they are as many as the model's outputs; None when neither is known (then the folders' sorted names)."""
    if class_map is None and cfg.class_names and len(cfg.class_names) == num_outputs(bundle.model):
        return list(cfg.class_names)
    return class_map


def index_folder(folder: str | Path | Location, *, classes: FolderIndex | Sequence[str] | None = None,
                 class_map: list[str] | None = None, num_classes: int | None = None,
                 warn: bool = True) -> FolderIndex:
    """One split's photos, in any layout (``fixres.data.layouts``): mapped onto ``classes`` by class name when they
    are known (a class the model never learned is an error), else in ``class_map`` order or the layout's own."""
    return index_location(folder, classes=classes, class_map=class_map, num_classes=num_classes, warn=warn)


def index_split(data: str | Path, split: str, **kw) -> FolderIndex:
    """The ``split`` ("train" or "val") of a data folder, shards or dataset (``fixres.data.layouts.resolve_split``),
    indexed as ``index_folder`` does."""
    return index_folder(resolve_split(data, split), **kw)


@dataclass(frozen=True)
class Splits:
    """A data folder's training and validation photos, val mapped onto the training classes; ``one_folder``
    when the folder has no train/ and val/ (both are then the same photos)."""

    train: FolderIndex
    val: FolderIndex
    one_folder: bool


def index_train_val(data: str | Path, *, class_map: list[str] | None = None, num_classes: int | None = None,
                    warn: bool = True) -> Splits:
    """train/ (in ``class_map`` order, else sorted) and val/ mapped onto its classes by name."""
    train_root, val_root = resolve_split(data, "train"), resolve_split(data, "val")
    train = index_folder(train_root, class_map=class_map, num_classes=num_classes)
    val = index_folder(val_root, classes=train, num_classes=num_classes, warn=warn)
    return Splits(train, val, one_folder=train_root == val_root)


@dataclass
class AdaptationInputs:
    """What fine-tuning, label-free adaptation and statistics start from: the model, its data config
    (with the caller's overrides, classes and number of outputs), the indexed splits and the test size."""

    bundle: ModelBundle
    cfg: DataConfig
    train: FolderIndex | None
    val: FolderIndex | None
    test_size: int
    #: one-line warnings for the caller to show (e.g. training classes without validation images)
    warnings: list[str] = field(default_factory=list)


def load_for_adaptation(spec: ModelSpec, data: str | Path, *, class_map: list[str] | None = None,
                        overrides: dict | None = None, test_size: int | None = None,
                        need_train: bool = True, stream: StreamRequest | None = None) -> AdaptationInputs:
    """Load ``spec``'s model and index ``data``'s train/ and val/ splits onto its classes.

    ``overrides``: DataConfig fields the caller sets (interpolation, mean, std, crop_ratio; None keeps the
    model's). ``test_size`` None: the size ``fixres.method.analysis`` recommends for the model's train size; a
    model with a fixed input size is moved to it (``fit_input_size``).
    A fixres export knows its classes: they map the folders when no ``class_map`` is given.
    ``stream``: the splits are shards to read front to back (``data.streams.ShardStream``s), not indexed.
    """
    bundle = spec.load()
    cfg = bundle.data_config.with_overrides(**(overrides or {}))
    n_out = num_outputs(bundle.model)
    class_map = class_names_for(bundle, cfg, class_map)
    if stream is not None:
        train, val = stream.open(data, classes=class_map, num_classes=n_out)
        return _inputs(bundle, cfg.with_overrides(class_names=train.classes, num_classes=n_out), train, val,
                       test_size, [])
    train_dir, val_dir = resolve_split(data, "train"), resolve_split(data, "val")
    if need_train and train_dir == val_dir:  # no splits: fitting and reporting on one folder
        raise UsageError(f"{data} has no train/ and val/ folders: the adaptation would be reported on the photos it "
                         "fitted on; lay it out as train/ and val/ (fixres fix splits one folder itself)")
    train = index_folder(train_dir, class_map=class_map, num_classes=n_out) if need_train else None
    classes = train.classes if train is not None else class_map
    val, warnings = None, []
    if exists(val_dir):  # one rule: val is mapped onto the training (or model) classes by name
        onto = (train if train is not None else classes) if classes else None
        val = index_folder(val_dir, classes=onto, num_classes=n_out)
        if train is not None and missing_classes_warning(val):
            warnings.append(missing_classes_warning(val))
    if train is None and val is None:
        raise UsageError(f"{data}: no val/ folder to evaluate on")
    shared = shared_photos(val.samples, train.samples) if train is not None and val is not None else []
    if shared:
        raise UsageError(f"{data}: {len(shared)} validation photos are also training photos (e.g. {shared[0]}): the "
                         "adaptation would be reported on photos it fitted on")
    cfg = cfg.with_overrides(class_names=tuple((train or val).classes), num_classes=n_out)
    return _inputs(bundle, cfg, train, val, test_size, warnings)


def _inputs(bundle: ModelBundle, cfg: DataConfig, train, val, test_size: int | None,
            warnings: list[str]) -> AdaptationInputs:
    size = test_size or recommend_test_size(train_size=cfg.train_size, crop_ratio=cfg.crop_ratio,
                                            stride=cfg.stride)["test_size"]
    fit_input_size(bundle.model, size, name=bundle.name)  # a fixed-size model follows S, or a one-line error
    return AdaptationInputs(bundle, cfg, train, val, size, warnings)


@dataclass(frozen=True)
class StreamRequest:
    """Training shards to stream (``--stream``, or a ``pipe:`` value): the validation shards (``val_data``; default
    the ``val-*.tar`` beside local training shards, none beside a ``pipe:`` value) and the photos the training
    shards hold when the user says so (``train_count``)."""

    val_data: str | None = None
    train_count: int | None = None

    def open(self, data: str | Path, *, classes: Sequence[str] | None, num_classes: int
             ) -> tuple[ShardStream, ShardStream | None]:
        """(training shards, validation shards or None), classes named by ``classes`` or numbered."""
        train = replace(open_stream(data, classes=classes, num_classes=num_classes, split="train"),
                        count=self.train_count)
        val = self.val_data or (None if is_stream(data) else data)
        return train, open_stream(val, classes=classes, num_classes=num_classes, split="val") if val else None
