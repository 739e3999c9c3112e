"""What fine-tuning, label-free adaptation and statistics start from: a model, its data config, the splits.

``load_for_adaptation`` loads a model (``fixres.models.loading``) and indexes a data folder's train/ and val/
splits onto the model's classes by the one class-set rule (``fixres.data.folders.index_val_onto``); the
test size defaults to the one the apparent-size analysis recommends for the model's train size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fixres.config import DataConfig
from fixres.data.folders import (
    FolderIndex,
    index_val_onto,
    missing_classes_warning,
    resolve_split,
    scan_folder,
    shared_photos,
)
from fixres.errors import UsageError
from fixres.method.analysis import recommend_test_size
from fixres.models.inputsize import fit_input_size
from fixres.models.loading import ModelBundle, ModelSpec, num_outputs


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
                        need_train: bool = True) -> AdaptationInputs:
    """Load ``spec``'s model and index ``data``'s train/ and val/ splits onto its classes.

    ``overrides``: DataConfig fields the caller sets (interpolation, mean, std, crop_ratio; None keeps the
    model's). ``test_size`` None: the size ``fixres.method.analysis`` recommends for the model's train size; a
    model with a fixed input size is moved to it (``fit_input_size``).
    A fixres export knows its classes: they map the folders when no ``class_map`` is given.
    """
    bundle = spec.load()
    cfg = bundle.data_config.with_overrides(**(overrides or {}))
    n_out = num_outputs(bundle.model)
    if class_map is None and cfg.class_names and len(cfg.class_names) == n_out:
        class_map = list(cfg.class_names)
    train_dir, val_dir = resolve_split(data, "train"), resolve_split(data, "val")
    if need_train and train_dir == val_dir:  # no splits: fitting and reporting on one folder
        raise UsageError(f"{data} has no train/ and val/ folders: the adaptation would be reported on the photos it "
                         "fitted on; lay it out as train/ and val/ (fixres fix splits one folder itself)")
    train = scan_folder(train_dir, class_map=class_map, num_classes=n_out) if need_train else None
    classes = train.classes if train is not None else class_map
    val, warnings = None, []
    if val_dir.is_dir():  # one rule: val is mapped onto the training (or model) classes by name
        val = (index_val_onto(val_dir, train if train is not None else classes, num_classes=n_out)
               if classes else scan_folder(val_dir, num_classes=n_out))
        if train is not None and missing_classes_warning(val):
            warnings.append(missing_classes_warning(val))
    if train is None and val is None:
        raise UsageError(f"{data}: no val/ folder to evaluate on")
    shared = shared_photos(val.samples, train.samples) if train is not None and val is not None else []
    if shared:
        raise UsageError(f"{data}: {len(shared)} validation photos are also training photos (e.g. {shared[0]}): the "
                         "adaptation would be reported on photos it fitted on")
    cfg = cfg.with_overrides(class_names=tuple((train or val).classes), num_classes=n_out)
    size = test_size or recommend_test_size(train_size=cfg.train_size, crop_ratio=cfg.crop_ratio,
                                            stride=cfg.stride)["test_size"]
    fit_input_size(bundle.model, size, name=bundle.name)  # a fixed-size model follows S, or a one-line error
    return AdaptationInputs(bundle, cfg, train, val, size, warnings)
