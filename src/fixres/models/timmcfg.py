"""timm's configuration dicts, typed: a ``pretrained_cfg`` / data config and a hub folder's ``config.json``.

timm describes a model's pre-processing in plain dicts: ``model.pretrained_cfg``, the data config
``resolve_model_data_config`` returns, and the ``pretrained_cfg`` object of a ``config.json`` (with
``architecture``, ``num_classes``, ``label_names`` and ``model_args`` beside it). Each is read once into
``PretrainedView`` or ``TimmConfig`` (``fixres.io.schema``: a field missing or of the wrong type reads as
its default) and used through attributes; ``timm_data_config`` turns the view into fixres's ``DataConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fixres.config import (
    DEFAULT_CROP_RATIO,
    DEFAULT_INTERPOLATION,
    DEFAULT_TRAIN_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATION_NAMES,
    DataConfig,
)
from fixres.io.schema import parse_or_none


@dataclass(frozen=True)
class PretrainedView:
    """The keys of a timm ``pretrained_cfg`` (or data config) that fixres reads; timm's defaults where absent."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = DEFAULT_INTERPOLATION
    crop_pct: float | None = None
    test_crop_pct: float | None = None
    input_size: tuple[int, ...] | None = None
    test_input_size: tuple[int, ...] | None = None
    num_classes: int | None = None
    label_names: tuple[str, ...] | None = None
    fixed_input_size: bool = False
    #: a module name, or several (timm lists e.g. a distilled model's two heads): kept as timm wrote them
    first_conv: object = None
    classifier: object = None
    #: the timm model name the config was made for
    architecture: str | None = None


@dataclass(frozen=True)
class TimmConfig:
    """A timm / hub folder's ``config.json``: the architecture to build and the pretrained_cfg it runs with."""

    architecture: str
    num_classes: int | None = None
    label_names: tuple[str, ...] | None = None
    model_args: dict[str, object] = field(default_factory=dict)
    pretrained_cfg: PretrainedView = field(default_factory=PretrainedView)


@dataclass(frozen=True)
class ModelTraits:
    """timm's per-instance traits (``model._traits``): the size a model is built for now."""

    img_size: tuple[int, ...] | None = None


def _as_json(value: Any) -> Any:
    # timm's dicts hold tuples where a JSON file holds lists; the schema reads lists.
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    return value


def pretrained_view(cfg: Any) -> PretrainedView:
    """``cfg`` (a pretrained_cfg or data config dict; anything else reads as empty) as a ``PretrainedView``."""
    return parse_or_none(PretrainedView, _as_json(cfg)) or PretrainedView()


def model_pretrained_view(model: Any) -> PretrainedView:
    """The ``pretrained_cfg`` of a timm model as a view (all defaults for a model without one)."""
    return pretrained_view(getattr(model, "pretrained_cfg", None) or {})


def model_traits(model: Any) -> ModelTraits:
    """The traits timm records on a model instance (all defaults on a timm without them)."""
    return parse_or_none(ModelTraits, _as_json(getattr(model, "_traits", {}) or {})) or ModelTraits()


def read_timm_config(doc: Any) -> TimmConfig | None:
    """A ``config.json`` document as a ``TimmConfig``; None when it names no architecture."""
    return parse_or_none(TimmConfig, _as_json(doc))


def timm_data_config(cfg: PretrainedView | dict, *, train_size: int | None, stride: int, **fields) -> DataConfig:
    """A timm data config (``mean``, ``std``, ``interpolation``, ``crop_pct``, ``input_size``) as a DataConfig;
    an interpolation fixres does not resample with (timm's "random", ...) becomes the default."""
    view = cfg if isinstance(cfg, PretrainedView) else pretrained_view(cfg)
    interp = view.interpolation if view.interpolation in INTERPOLATION_NAMES else DEFAULT_INTERPOLATION
    return DataConfig(mean=view.mean, std=view.std, interpolation=interp,
                      crop_ratio=float(view.crop_pct or DEFAULT_CROP_RATIO),
                      train_size=int(train_size or (view.input_size or (DEFAULT_TRAIN_SIZE,))[-1]),
                      stride=stride, **fields)

