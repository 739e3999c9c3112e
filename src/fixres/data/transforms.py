"""Train and test geometry: the one module that decides how a photo becomes a network input.

Vocabulary (used everywhere in fixres):
  * ``train_size``  side of the square RandomResizedCrop fed to the network while training;
  * ``test_size``   side of the square centre crop fed to the network at test time;
  * ``crop_ratio``  test_size / resize, where ``resize`` is the shorter image side before cropping.

``resize_for(test_size, crop_ratio)`` is the only place that turns the last two into a resize.

Builders (keyword-only, torchvision.transforms.v2, antialiased resampling):
  * ``train_transform``   RandomResizedCrop + flip (+ ColorJitter 0.3): "train DA";
  * ``test_transform``    resize shorter side + CenterCrop: "test DA";
  * ``test2_transform``   test geometry + random horizontal shift + flip + mild jitter: "test DA2";
  * ``control_transform`` appendix D control: resize + fixed-size random crop (no scale augmentation),
    then the same flip (+ jitter) as train DA, so "RRC vs control" changes the geometry only;
  * ``build_transform``   pick one of the above by name (``AUGMENTATIONS``);
  * ``decode_plan``       how small a JPEG may be decoded for a transform (reduced-size decoding).

The paper's train DA (section 3 and 5.1: "random resized crop, horizontal flip and color jitter")
includes the colour jitter: ``build_transform`` uses it for "train" and "control" unless
``color_jitter=False`` is asked for.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from fixres.config import RRC_RATIO, RRC_SCALE, DataConfig, resize_for, validate_size
from fixres.data.images import decoded_reduction, jpeg_reduction
from fixres.errors import UsageError

#: The paper's colour jitter strength for training (brightness, contrast, saturation).
TRAIN_JITTER = 0.3
#: "test DA2": mild jitter and a horizontal shift of the centre crop of at most this fraction of the slack.
TEST2_JITTER = 0.1
TEST2_MAX_SHIFT = 0.5

INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}

AUGMENTATIONS = ("train", "test", "test2", "control")
#: Largest value of an 8-bit pixel: ``ToDtype(scale=True)`` maps [0, 255] onto [0, 1].
UINT8_MAX = 255


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise UsageError(f"unknown interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}") from None


class NormalizedTensor:
    """PIL RGB image -> float32 (C, H, W) tensor scaled to [0, 1], minus ``mean``, over ``std``.

    The arithmetic of v2's ``ToImage`` + ``ToDtype(float32, scale=True)`` + ``Normalize``, in the
    same order on the same dtype (bit-identical output, checked by a test), in one call: at low test
    sizes the dispatch of those three transforms costs about as much as the arithmetic (0.1 ms of a
    2 ms photo at 128 px). Anything but an RGB PIL image (a tensor, another mode) goes through them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.v2 = v2.Compose(plain_normalize(mean, std))

    def __call__(self, img):
        if not isinstance(img, Image.Image) or img.mode != "RGB" or self.mean.numel() != 3:
            return self.v2(img)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        return pixels.to(torch.float32).mul_(1.0 / UINT8_MAX).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"NormalizedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def plain_normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    """v2's ToImage + ToDtype(float32, scale=True) + Normalize: what ``NormalizedTensor`` computes, as plain ops."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _to_tensor_normalized(cfg: DataConfig) -> list:
    return [NormalizedTensor(cfg.mean, cfg.std)]


def train_transform(*, train_size: int, cfg: DataConfig, color_jitter: bool = False,
                    scale: Sequence[float] = RRC_SCALE, ratio: Sequence[float] = RRC_RATIO) -> v2.Compose:
    """"train DA": RandomResizedCrop(train_size) + horizontal flip (+ ColorJitter(0.3, 0.3, 0.3))."""
    validate_size(train_size, "train_size")
    crop = v2.RandomResizedCrop(train_size, scale=tuple(scale), ratio=tuple(ratio),
                                interpolation=interpolation_mode(cfg.interpolation), antialias=True)
    return v2.Compose([crop] + _flip_jitter_normalized(cfg, color_jitter))


def _flip_jitter_normalized(cfg: DataConfig, color_jitter: bool) -> list:
    """What train DA does after its crop (flip, optional jitter, normalise): shared with the control."""
    ops: list = [v2.RandomHorizontalFlip()]
    if color_jitter:
        ops.append(v2.ColorJitter(TRAIN_JITTER, TRAIN_JITTER, TRAIN_JITTER))
    return ops + _to_tensor_normalized(cfg)


@dataclass(frozen=True)
class Geometry:
    """Where a view's pixels come from, resolved once: the shorter side resized to ``resize``, then a ``crop`` x
    ``crop`` crop (centred at test; random for the control and test DA2), resampled with ``interpolation``."""

    crop: int
    resize: int
    interpolation: str

    def resize_op(self) -> v2.Resize:
        return v2.Resize(self.resize, interpolation=interpolation_mode(self.interpolation), antialias=True)


def geometry_for(size: int, cfg: DataConfig, crop_ratio: float | None = None) -> Geometry:
    """The geometry of a ``size`` view: resize ``resize_for(size, crop_ratio)`` (the data config's crop ratio unless
    another is given), crop ``size``, the data config's interpolation."""
    ratio = cfg.crop_ratio if crop_ratio is None else crop_ratio
    return Geometry(crop=size, resize=resize_for(size, ratio), interpolation=cfg.interpolation)


def resize_center_crop(geometry: Geometry) -> v2.Compose:
    """Resize the shorter side to ``geometry.resize``, then CenterCrop(``geometry.crop``); PIL out."""
    return v2.Compose([geometry.resize_op(), v2.CenterCrop(geometry.crop)])


def test_transform(geometry: Geometry, cfg: DataConfig) -> v2.Compose:
    """"test DA": deterministic resize + centre crop, then normalise (``cfg``'s mean and std)."""
    return v2.Compose([resize_center_crop(geometry)] + _to_tensor_normalized(cfg))


def torchvision_transform(geometry: Geometry, cfg: DataConfig) -> v2.Compose:
    """Test DA in plain torchvision v2 ops only, for serving without fixres: Resize, CenterCrop, ToImage,
    ToDtype(float32, scale=True), Normalize. Same arithmetic as ``test_transform`` on a fully decoded photo
    (``test_transform`` additionally decodes large JPEGs at a reduced size, which serving need not do)."""
    return v2.Compose([resize_center_crop(geometry), *plain_normalize(cfg.mean, cfg.std)])


def torchvision_transform_code(geometry: Geometry, cfg: DataConfig) -> str:
    """The source of ``torchvision_transform`` for these settings, as a user would type it."""
    mode = interpolation_mode(geometry.interpolation).name
    return (f"v2.Compose([\n"
            f"    v2.Resize({geometry.resize}, "
            f"interpolation=InterpolationMode.{mode}, antialias=True),\n"
            f"    v2.CenterCrop({geometry.crop}),\n"
            f"    v2.ToImage(),\n"
            f"    v2.ToDtype(torch.float32, scale=True),\n"
            f"    v2.Normalize(mean={[float(v) for v in cfg.mean]}, std={[float(v) for v in cfg.std]}),\n"
            f"])")


class ShiftedCenterCrop(torch.nn.Module):
    """Square crop centred vertically, shifted horizontally by a random fraction of the free margin."""

    def __init__(self, size: int, max_shift: float = TEST2_MAX_SHIFT) -> None:
        super().__init__()
        self.size = size
        self.max_shift = max_shift

    def forward(self, img):
        w, h = TF.get_size(img)[1], TF.get_size(img)[0]
        top = int(round((h - self.size) / 2.0))
        slack = (w - self.size) / 2.0
        shift = random.uniform(-self.max_shift, self.max_shift) * slack
        left = int(round(slack + shift))
        left = min(max(left, 0), max(w - self.size, 0))
        return TF.crop(img, top, left, self.size, self.size)


def test2_transform(geometry: Geometry, cfg: DataConfig, *, max_shift: float = TEST2_MAX_SHIFT) -> v2.Compose:
    """"test DA2": test resize, randomly shifted centre crop, horizontal flip, mild colour jitter."""
    return v2.Compose([
        geometry.resize_op(),
        ShiftedCenterCrop(geometry.crop, max_shift),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(TEST2_JITTER, TEST2_JITTER, TEST2_JITTER),
    ] + _to_tensor_normalized(cfg))


def control_transform(geometry: Geometry, cfg: DataConfig, *, color_jitter: bool = False) -> v2.Compose:
    """Appendix D control: resize the shorter side as at test time, then a fixed-size random crop;
    then exactly train DA's flip (+ jitter), so that only the crop differs from train DA."""
    return v2.Compose([geometry.resize_op(), v2.RandomCrop(geometry.crop)] + _flip_jitter_normalized(cfg, color_jitter))


#: The paper's train DA includes colour jitter (section 3: "random-resized crop, horizontal flip and
#: color jitter"); ``build_transform`` uses it for "train" and "control" unless told otherwise.
PAPER_COLOR_JITTER = True


def build_transform(augment: str, *, size: int, cfg: DataConfig, crop_ratio: float | None = None,
                    color_jitter: bool | None = None) -> Callable:
    """Build the named augmentation at ``size`` ("train" = train DA, "test", "test2", "control").

    ``color_jitter`` applies to "train" and "control" alike; None means the paper's train DA
    (``PAPER_COLOR_JITTER``: with jitter), so fine-tuning with "train" matches the paper.
    """
    jitter = PAPER_COLOR_JITTER if color_jitter is None else bool(color_jitter)
    if augment == "train":
        return train_transform(train_size=size, cfg=cfg, color_jitter=jitter)
    if augment not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    geometry = geometry_for(size, cfg, crop_ratio)
    if augment == "test":
        return test_transform(geometry, cfg)
    if augment == "test2":
        return test2_transform(geometry, cfg)
    return control_transform(geometry, cfg, color_jitter=jitter)


class MultiView:
    """Apply several transforms to one decoded image (one decode, many test sizes: the one-pass sweep)."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img):
        return tuple(t(img) for t in self.transforms)


class TenCropStack:
    """Resize, then the 4 corners + centre crops and their mirrors, normalised and stacked to (10, C, S, S).

    A plain callable rather than a ``v2.Compose`` step: v2 containers unpack a tuple output into
    separate inputs, so a Lambda after TenCrop would see one crop at a time.
    """

    def __init__(self, geometry: Geometry, cfg: DataConfig) -> None:
        self.test_size = geometry.crop
        self.resize = geometry.resize_op()
        self.normalize = NormalizedTensor(cfg.mean, cfg.std)

    def __call__(self, img):
        crops = TF.ten_crop(self.resize(img), [self.test_size, self.test_size])
        return torch.stack([self.normalize(c) for c in crops])


def ten_crop_transform(geometry: Geometry, cfg: DataConfig) -> TenCropStack:
    """10-crop testing: 4 corners + centre of the resized image, and their mirrors; output (10, C, S, S)."""
    return TenCropStack(geometry, cfg)


# --------------------------------------------------------------------------- reduced-size decoding

#: PIL resampling filters of the interpolation modes (the reduced crop path resizes with PIL directly).
PIL_RESAMPLE = {InterpolationMode.NEAREST: Image.Resampling.NEAREST,
                InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
                InterpolationMode.BICUBIC: Image.Resampling.BICUBIC}


class FixedResizePlan:
    """Transforms that start by resizing the shorter side (test views, 10-crop): decode only what each needs.

    Every view gets exactly the pixels its own single-size evaluation would get: the views are
    grouped by the JPEG reduction each one needs for this photo (``images.jpeg_reduction`` of its
    resize side), and the photo is decoded once per distinct reduction (a sweep of K sizes costs
    1-4 decodes instead of K, and its row at size S equals ``evaluate`` at S alone, bit for bit).
    On a reduced decode, a "resize + centre crop" view is cut in one PIL resize with a box (only
    the crop's pixels are resampled, at the positions resize-then-crop would sample, within a grey
    level or a few); a view decoded at full size runs its untouched transform.
    """

    def __init__(self, transform: Callable, inner: Callable) -> None:
        self.transform, self.inner, self.full = transform, inner, None
        self.multi = isinstance(inner, MultiView)
        self.views = inner.transforms if self.multi else [inner]
        self.shorts = [_fixed_short_side(v) for v in self.views]
        self.fused = [_resize_crop_view(v) for v in self.views]
        self.groups: list[tuple[int, list[int]]] = []

    def need(self, size: tuple[int, int]) -> int:
        """Called with the upright header size of a JPEG: the shorter side of the first (finest) decode."""
        self.full = size
        self.groups = decode_groups(min(size), self.shorts)
        return max(self.shorts[i] for i in self.groups[0][1])

    def finish(self, img, reload: Callable[[int], Image.Image] | None = None):
        """The views' outputs; ``reload(short)`` decodes the same photo again for a coarser reduction."""
        if self.full is None or len(self.groups) == 1 and img.size == self.full:
            return self.transform(img)  # not a JPEG, or no view is reduced: the plain path
        if len(self.groups) > 1 and reload is None:
            raise ValueError("FixedResizePlan.finish: views need different reductions, pass reload=")
        outs: list = [None] * len(self.views)
        for g, (_, members) in enumerate(self.groups):
            decoded = img if g == 0 else reload(max(self.shorts[i] for i in members))
            for i in members:
                outs[i] = self._view(i, decoded)
        return tuple(outs) if self.multi else outs[0]

    def _view(self, i: int, img):
        fused = self.fused[i]
        if fused is None or img.size == self.full:
            return _call_like(self.transform, self.inner, self.views[i], img)
        short, crop, mode, rest = fused
        return _call_like(self.transform, self.inner, rest, _resize_box_crop(img, short, crop, mode, full=self.full))

    def abort(self) -> None:
        pass


def decode_groups(short_side: int, shorts: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(reduction, indices of the views needing it) for a photo whose shorter side is ``short_side``.

    Finest reduction first; views needing the same reduction share one decode.
    """
    by_k: dict[int, list[int]] = {}
    for i, short in enumerate(shorts):
        by_k.setdefault(jpeg_reduction(short_side, short), []).append(i)
    return sorted(by_k.items())


def _flat_ops(t) -> list:
    return [op for sub in t.transforms for op in _flat_ops(sub)] if isinstance(t, v2.Compose) else [t]


def _resize_crop_view(t):
    """(short side, crop side, interpolation, the ops after the crop) of a Resize + CenterCrop pipeline."""
    ops = _flat_ops(t) if isinstance(t, v2.Compose) else []
    if (len(ops) < 2 or not isinstance(ops[0], v2.Resize) or not isinstance(ops[1], v2.CenterCrop)
            or len(ops[0].size) != 1 or ops[0].max_size is not None or ops[0].interpolation not in PIL_RESAMPLE
            or len(set(ops[1].size)) != 1):
        return None
    return int(ops[0].size[0]), int(ops[1].size[0]), ops[0].interpolation, v2.Compose(ops[2:])


def _resize_box_crop(img: Image.Image, short: int, crop: int, mode: InterpolationMode,
                     full: tuple[int, int] | None = None) -> Image.Image:
    """Resize the shorter side to ``short`` and centre-crop ``crop``, resampling only the crop's pixels.

    ``img`` may be a reduced decode of a photo whose upright size is ``full``: the resized size and
    crop offsets are then those torchvision's ``resize`` and ``center_crop`` give the *full* photo,
    and the crop box is mapped onto ``img`` by the exact JPEG reduction (``images.
    decoded_reduction``), so the crop covers the same part of the scene as a full decode would.
    """
    w, h = full or img.size
    rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if crop > min(rw, rh):
        return TF.center_crop(TF.resize(img, [short], interpolation=mode, antialias=True), [crop, crop])
    top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
    k = decoded_reduction((w, h), img.size)
    sx, sy = w / rw / k, h / rh / k
    return img.resize((crop, crop), PIL_RESAMPLE[mode],
                      box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))


class CropPlan:
    """RandomResizedCrop first: draw the crop from the header size, decode only the pixels it needs.

    ``need`` draws the crop (the same random numbers, in the same order, as the transform would) and
    asks for the shorter side at which the crop still has ``size`` pixels. ``finish`` cuts that crop
    from the (possibly reduced) image with PIL's box resize and runs the rest of the pipeline. When
    no reduction happened, the random state is rewound and the untouched transform runs instead: the
    exact old code path, bit for bit.
    """

    def __init__(self, outer: Callable, compose: v2.Compose) -> None:
        self.outer, self.compose, self.rrc = outer, compose, compose.transforms[0]
        self.full: tuple[int, int] | None = None
        self.state = self.params = None

    def need(self, size: tuple[int, int]) -> int | None:
        w, h = size
        if min(w, h) < 2 * max(self.rrc.size):
            return None  # no crop of this photo could be decoded smaller: the plain path, no draw here
        self.full = size
        self.state = torch.get_rng_state()
        self.params = self.rrc.make_params([torch.zeros(()).expand(1, h, w)])  # a size, no pixels
        side = max(1, min(self.params["height"], self.params["width"]))
        return math.ceil(max(self.rrc.size) * min(w, h) / side)

    def abort(self) -> None:
        """The photo was skipped: give back the random numbers the crop took, as a full decode would."""
        if self.state is not None:
            torch.set_rng_state(self.state)

    def finish(self, img, reload: Callable[[int], Image.Image] | None = None):  # noqa: ARG002 - one decode
        if self.full is None or img.size == self.full:
            self.abort()
            return self.outer(img)
        k = decoded_reduction(self.full, img.size)  # exact: the crop covers the same scene as in full
        p = self.params
        box = (p["left"] / k, p["top"] / k, (p["left"] + p["width"]) / k, (p["top"] + p["height"]) / k)
        out_h, out_w = (self.rrc.size * 2)[:2]
        rest = v2.Compose(self.compose.transforms[1:])
        crop = img.resize((out_w, out_h), PIL_RESAMPLE[self.rrc.interpolation], box=box)
        return _call_like(self.outer, self.compose, rest, crop)


def _call_like(outer: Callable, inner: Callable, fn: Callable, x):
    """Call ``fn(x)`` inside the same wrapper (e.g. ``engine.SingleThreaded``) that wraps ``inner``."""
    return type(outer)(fn)(x) if outer is not inner else fn(x)


def _unwrap(transform: Callable) -> Callable:
    """The transform inside a plain wrapper object (one holding ``.transform``, e.g. SingleThreaded)."""
    inner = getattr(transform, "transform", None)
    return inner if inner is not None and not isinstance(transform, v2.Transform) else transform


def _fixed_short_side(t) -> int | None:
    """The shorter side a deterministic test-style transform resizes to first (None: not known)."""
    if isinstance(t, v2.Compose) and t.transforms:
        return _fixed_short_side(t.transforms[0])
    if isinstance(t, v2.Resize) and isinstance(t.size, (list, tuple)) and len(t.size) == 1 and t.max_size is None:
        return int(t.size[0])
    if isinstance(t, MultiView) and t.transforms:
        sides = [_fixed_short_side(v) for v in t.transforms]
        return None if None in sides else max(sides)  # the largest need (the finest decode)
    if isinstance(t, TenCropStack):
        return _fixed_short_side(t.resize)
    return None


def decode_plan(transform: Callable) -> FixedResizePlan | CropPlan | None:
    """How small a photo may be decoded for ``transform`` (a fresh plan per photo), or None: full size.

    Test-style transforms (resize shorter side, then crop; also MultiView sweeps and 10-crop) need
    the resize side; train DA (RandomResizedCrop first) needs as much as its randomly drawn crop.
    """
    inner = _unwrap(transform)
    if isinstance(inner, v2.Compose) and inner.transforms and isinstance(inner.transforms[0], v2.RandomResizedCrop):
        return CropPlan(transform, inner)
    return FixedResizePlan(transform, inner) if _fixed_short_side(inner) else None
