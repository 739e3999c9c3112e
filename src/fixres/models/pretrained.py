"""Pretrained weights of timm and torchvision, from their local caches, and the recipe torchvision weights bring.

``--pretrained`` reads the files timm (Hugging Face hub cache) and torchvision (``$TORCH_HOME/hub``) keep;
when they are absent the library downloads them if the machine is online, and with ``HF_HUB_OFFLINE=1``
the caller gets a one-line error saying what to download and where. Loads never unpickle
(``torch.load(weights_only=True)`` is forced for the libraries' own loaders). torchvision weights carry
their test transform in ``transforms()`` (resize, crop, interpolation, mean, std) and their recipe in
``meta["recipe"]``; the recipe's train size is not in the metadata, so the one table here maps it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fixres.errors import FixresError, UsageError
from fixres.io.schema import parse

#: Train sizes of torchvision recipes, keyed by the anchor of ``weights.meta["recipe"]``: the weights'
#: metadata gives the test transform (resize, crop) but not the RandomResizedCrop size. TorchVision's new
#: recipe (pytorch/vision#3995, "How to train state-of-the-art models" blog: ``--train-crop-size 176
#: --val-resize-size 232``) trains at 176 and tests at 224. Other recipes train at their crop size.
TORCHVISION_RECIPE_TRAIN_SIZES = {
    "issuecomment-1013906621": 176,  # ResNet-50 IMAGENET1K_V2
    "new-recipe": 176,               # ResNet-101/152, ResNeXt-50, RegNets IMAGENET1K_V2
    "new-recipe-with-fixres": 176,   # the same recipe, named for its FixRes mitigation
}
#: Values of HF_HUB_OFFLINE that mean "offline" (huggingface_hub's own convention).
_TRUE_VALUES = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class HubEnvironment:
    """The Hugging Face hub variables of the environment ('' where unset), as huggingface_hub reads them."""

    offline: str = field(default="", metadata={"json": "HF_HUB_OFFLINE"})
    hub_cache: str = field(default="", metadata={"json": "HF_HUB_CACHE"})
    home: str = field(default="", metadata={"json": "HF_HOME"})


@dataclass(frozen=True)
class TorchvisionMeta:
    """The key of a torchvision weights' ``meta`` read here: the link to its training recipe."""

    recipe: str = ""


def hub_environment() -> HubEnvironment:
    """The hub variables, read now (not at import: a caller or test may set them in between)."""
    return parse(HubEnvironment, dict(os.environ))


def is_offline() -> bool:
    """The machine was declared offline (HF_HUB_OFFLINE, read now: fixres applies it to torchvision too)."""
    return hub_environment().offline.strip().lower() in _TRUE_VALUES


def _hf_cache_dir() -> Path:
    env = hub_environment()
    if env.hub_cache:
        return Path(env.hub_cache)
    if env.home:
        return Path(env.home) / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def weights_only_loads():
    """Force ``torch.load(weights_only=True)`` for library loaders that would unpickle (torch.hub's default)."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def timm_pretrained_file(name: str) -> tuple[Path | None, str]:
    """(cached weight file or None, what to download and where) for timm's default weights of ``name``."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise UsageError(f"timm has no pretrained weights for {name!r}")
    cache = _hf_cache_dir()
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
            if isinstance(found, str):
                return Path(found), ""
        return None, f"`huggingface-cli download {repo}` (into the Hugging Face cache {cache}, or set HF_HOME)"
    if cfg.url:
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        return (target if target.is_file() else None), f"{cfg.url} into {target.parent}"
    raise UsageError(f"timm has no downloadable weights for {name!r}")


def torchvision_weights(name: str, tag: str = "DEFAULT"):
    """The torchvision weights enum member of ``name`` (``tag``: DEFAULT, IMAGENET1K_V1, ...)."""
    import torchvision
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise UsageError(f"torchvision has no pretrained weights for {name!r}") from None
    try:
        return enum[tag]
    except KeyError:
        raise UsageError(f"torchvision {name} has no weights {tag!r}; choose one of "
                         f"{', '.join(w.name for w in enum)}") from None


def torchvision_weights_file(weights) -> tuple[Path | None, str]:
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return (target if target.is_file() else None), f"{weights.url} into {target.parent}"


def require_cached(found: Path | None, what: str, name: str) -> None:
    """Refuse (one line) when weights are not cached and the machine is offline; else let the library fetch."""
    if found is None and is_offline():
        raise FixresError(f"--pretrained: the weights of {name} are not in the local cache and the machine is "
                          f"offline (HF_HUB_OFFLINE); download {what} on a machine with internet, or use --checkpoint")


def torchvision_recipe(weights) -> tuple[dict, int, str]:
    """(DataConfig fields, test size, note) of torchvision ``weights``: its transforms() and its recipe."""
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    anchor = parse(TorchvisionMeta, weights.meta).recipe.rpartition("#")[2]
    train = TORCHVISION_RECIPE_TRAIN_SIZES.get(anchor)
    note = (f"trained at {train} (torchvision recipe {anchor})" if train else
            f"train size taken as the weights' crop size {crop} (the recipe's train crop is not in the metadata)")
    fields = dict(mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std),
                  interpolation=t.interpolation.value, crop_ratio=crop / resize, train_size=train or crop)
    return fields, crop, note
