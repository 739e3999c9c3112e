"""The timm-native export folder: ``config.json`` beside ``model.safetensors``, as timm and the hub read it.

``timm.create_model("local-dir:PATH", pretrained=True)`` reads ``PATH/config.json`` (``architecture``,
``num_classes``, ``label_names``, ``model_args``, ``pretrained_cfg``) and then the weights file, whose
``module.`` / ``_orig_mod.`` prefixes it strips itself. timm turns ``pretrained_cfg`` into its own
``PretrainedCfg`` dataclass: an unknown key is an error and every key left out takes timm's default
(bicubic, crop 0.875, ImageNet mean and std), so every pre-processing field is written here.
``timm.data.resolve_data_config({}, model=m, use_test_size=True)`` then returns the fixed test size, crop,
mean, std and interpolation. A fixed-input-size model records its size twice: ``model_args.img_size``
(so it is built at that size) and ``pretrained_cfg.input_size`` with ``fixed_input_size`` (so the data
config says it). The same folder is what ``huggingface_hub.upload_folder`` publishes.

The built-in demo networks are timm classes with narrow stages: they are written as the timm
architecture of their class with the stage widths as ``model_args``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from fixres.config import resize_for
from fixres.errors import UsageError
from fixres.io.atomic import write_json
from fixres.io.meta import parse_export_meta
from fixres.models.timmcfg import TimmConfig, model_pretrained_view, read_timm_config

CONFIG_NAME = "config.json"
#: Added to the resize when choosing a crop_pct, so that timm's floor lands on it despite float rounding.
TIMM_RESIZE_MARGIN = 1e-6
#: The weights files timm's local-dir loader tries, in its order.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
#: Built-in networks as a timm architecture plus the arguments that make it the same network.
BUILTIN_AS_TIMM = {
    "fixres_tiny_resnet": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}),
    "fixres_small_resnet": ("resnet18", {"layers": [2, 2, 2, 2], "channels": [32, 64, 128, 256],
                                         "stem_width": 32}),
    "fixres_tiny_vit": ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4,
                                                 "num_heads": 4, "mlp_ratio": 2.0, "dynamic_img_size": True}),
    "fixres_tiny_convnext": ("convnext_atto", {"depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128],
                                               "conv_mlp": False}),
}


def timm_architecture(model_name: str) -> tuple[str, dict] | None:
    """(timm architecture, model_args) of a model fixres built by this name; None when timm cannot build it
    (a torchvision model, an unknown name)."""
    if model_name in BUILTIN_AS_TIMM:
        arch, args = BUILTIN_AS_TIMM[model_name]
        return arch, dict(args)
    name = model_name.removeprefix("timm:")
    if ":" in name:
        return None
    import timm
    return (name, {}) if timm.is_model(name) else None


def timm_crop_pct(test_size: int, crop_ratio: float) -> float:
    """The crop_pct for which timm's eval resize, floor(test_size / crop_pct), is fixres's
    ``resize_for(test_size, crop_ratio)`` (a rounding): the crop ratio itself where the two agree."""
    resize = resize_for(test_size, crop_ratio)
    if math.floor(test_size / crop_ratio) == resize:
        return float(crop_ratio)
    return test_size / (resize + TIMM_RESIZE_MARGIN)


def timm_config(model: nn.Module, meta: dict, *, architecture: str, model_args: dict) -> dict:
    """The ``config.json`` of an export whose ``fixres.json`` is ``meta``."""
    export = parse_export_meta(meta)
    size = [3, export.test_size, export.test_size]
    own = model_pretrained_view(model)
    args = {**model_args, **{k: list(v) if isinstance(v, tuple) else v for k, v in export.model_kwargs.items()}}
    fixed = "img_size" in export.model_kwargs
    crop = timm_crop_pct(export.test_size, export.crop_ratio)
    pretrained_cfg = {
        "input_size": size, "test_input_size": size, "fixed_input_size": fixed,
        "crop_pct": crop, "test_crop_pct": crop, "crop_mode": "center",
        "interpolation": export.interpolation, "mean": list(export.mean), "std": list(export.std),
        "num_classes": export.num_classes,
        "first_conv": own.first_conv, "classifier": own.classifier,
    }
    config = {"architecture": architecture, "num_classes": export.num_classes,
              "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None}}
    if export.class_names:
        config["label_names"] = list(export.class_names)
    if args:
        config["model_args"] = args
    return config


def write_timm_config(out_dir: str | Path, model: nn.Module, meta: dict) -> Path | None:
    """Write ``out_dir/config.json`` when timm can build the model; None otherwise (torchvision models)."""
    found = timm_architecture(meta["model"])
    if found is None:
        return None
    path = Path(out_dir) / CONFIG_NAME
    write_json(path, timm_config(model, meta, architecture=found[0], model_args=found[1]))
    return path


def read_timm_folder(folder: str | Path) -> tuple[dict, TimmConfig, Path]:
    """(config.json as read, the same typed, weights file) of a timm / hub-style folder, or a one-line error
    saying what is missing."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{folder}: a folder checkpoint needs fixres.json or config.json beside its weights") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{config_path}: not a readable config.json ({exc})") from None
    typed = read_timm_config(config)
    if typed is None:
        raise UsageError(f"{config_path}: names no timm architecture (an 'architecture' field)")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise UsageError(f"{folder}: no weights file ({', '.join(WEIGHT_FILES)})")
    return config, typed, weights
