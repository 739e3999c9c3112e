"""Input sizes of the models that have one: the test size a model can run at, and how it gets there.

Most CNNs take any size. timm's ViT, DeiT, EVA and Swin families are built with ``dynamic_img_size=True``
(``size_kwargs``): their absolute position embeddings are resampled to each input's patch grid and Swin's
attention masks follow the size, so one model evaluates and fine-tunes at every test size and gives the
same outputs at its native size. Other models have a fixed input size (``fixed_input_size``):
``fit_input_size`` moves them to a test size through timm's own mechanisms -- ``set_input_size`` (BEiT,
MaxViT, ...: position embeddings, windows and relative-position tables) or ``resample_abs_pos_embed``
(CaiT, ConViT: ViT-likes without set_input_size) -- and returns what a loader must pass to rebuild them
so (``export_model_kwargs``, recorded in fixres.json as ``model_kwargs``); a model with no such mechanism
gets a one-line error naming the size it accepts. Our own code only where timm has no method for the
model: reading its size from timm's traits, and resampling a position embedding timm's checkpoint
filters would resample the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from fixres.errors import FixresError
from fixres.models.timmcfg import model_pretrained_view, model_traits

#: timm modules whose models take ``dynamic_img_size``: their absolute position embeddings are resampled to
#: each input's patch grid (timm's resample_abs_pos_embed) and Swin's attention masks follow the size, so
#: one model evaluates and fine-tunes at any test size. Other fixed-size models use ``fit_input_size``.
DYNAMIC_SIZE_MODULES = ("vision_transformer", "deit", "eva", "swin_transformer", "swin_transformer_v2",
                        "swin_transformer_v2_cr")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def size_kwargs(name: str, model_kwargs: dict) -> dict:
    """``dynamic_img_size=True`` for timm families that support it, unless the caller sets the input size."""
    from timm.models import model_entrypoint
    if "img_size" in model_kwargs or "dynamic_img_size" in model_kwargs:
        return {}
    module = model_entrypoint(name).__module__.rpartition(".")[2]
    return {"dynamic_img_size": True} if module in DYNAMIC_SIZE_MODULES else {}


def native_size(model: nn.Module) -> int | None:
    """The input size a fixed-size model was built for (timm's model traits / pretrained_cfg), else None."""
    try:
        from timm.models._input import get_model_input_config
        cfg = get_model_input_config(model)  # timm's own dict: it always holds both keys
        return int(cfg["input_size"][-1]) if cfg["fixed_input_size"] else None
    except (ImportError, AttributeError, KeyError, TypeError):
        view = model_pretrained_view(model)
        return int(view.input_size[-1]) if view.fixed_input_size and view.input_size else None


def fixed_input_size(model: nn.Module) -> int | None:
    """The one input size a model accepts (timm's fixed_input_size, torchvision ViT's image_size), else None."""
    size = native_size(model)
    if size is None and isinstance(getattr(model, "image_size", None), int):
        size = int(model.image_size)  # torchvision VisionTransformer checks it on every forward
    return size


def fit_input_size(model: nn.Module, size: int, *, name: str = "") -> dict:
    """Make ``model`` run at ``size`` x ``size``; returns the keywords a loader must pass to rebuild it so.

    Flexible models (CNNs, timm ViT/Swin built with dynamic_img_size) need nothing: {}. A fixed-size timm
    model follows the size through its own ``set_input_size`` (position embeddings, windows and
    relative-position tables resampled by timm): {"img_size": [size, size]}. A fixed-size model without
    one gets a one-line error naming it and the size it accepts.
    """
    fixed = fixed_input_size(model)
    if fixed is None or fixed == size:
        return {} if fixed is None else _recorded_size(model)
    try:
        if hasattr(model, "set_input_size"):
            model.set_input_size(img_size=(size, size))
        elif not _resample_abs_pos(model, size):
            raise FixresError(f"{name or type(model).__name__} runs only at {fixed}x{fixed} px (a fixed input size, "
                              f"no way to change it); use test size {fixed}, or a timm model that takes any size")
    except FixresError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a window size that does not divide the new grid
        raise FixresError(f"{name or type(model).__name__} cannot run at {size}x{size} px: {_first_line(exc)}; "
                          f"it was built for {fixed}x{fixed}") from None
    return {"img_size": [size, size]}


def _resample_abs_pos(model: nn.Module, size: int) -> bool:
    """A ViT-like without set_input_size (CaiT, ConViT, ...): its patch embedding follows the size and its
    absolute position embedding is resampled to the new grid (timm's resample_abs_pos_embed)."""
    from timm.layers import resample_abs_pos_embed
    patch, pos = getattr(model, "patch_embed", None), getattr(model, "pos_embed", None)
    if not isinstance(pos, nn.Parameter) or pos.dim() != 3 or not hasattr(patch, "set_input_size"):
        return False
    old = tuple(int(g) for g in patch.grid_size)
    prefix = pos.shape[1] - old[0] * old[1]  # class/distillation tokens stored in the embedding
    if prefix < 0:
        return False
    patch.set_input_size(img_size=(size, size))
    new = tuple(int(g) for g in patch.grid_size)
    with torch.no_grad():
        model.pos_embed = nn.Parameter(resample_abs_pos_embed(pos.detach(), new_size=list(new), old_size=list(old),
                                                              num_prefix_tokens=prefix),
                                       requires_grad=pos.requires_grad)
    try:
        from timm.models._input import update_model_input_size
        update_model_input_size(model, (size, size))  # the model's traits: its size now, for export
    except ImportError:
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "input_size": (3, size, size)}
    return True


def _recorded_size(model: nn.Module) -> dict:
    """{"img_size": ...} when a fixed-size timm model was moved off its pretrained size, else {}."""
    size = model_traits(model).img_size
    cfg_size = (model_pretrained_view(model).input_size or (0, 0, 0))[-2:]
    return {"img_size": list(size)} if size and size != cfg_size else {}


def export_model_kwargs(model: nn.Module) -> dict:
    """What a loader must pass to ``create_model`` to rebuild ``model`` as it is now (fixres.json
    ``model_kwargs``): the input size of a fixed-size model moved by ``fit_input_size``."""
    return _recorded_size(model) if fixed_input_size(model) is not None else {}
