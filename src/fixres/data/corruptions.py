"""Corrupted photos (ImageNet-C style, made on the fly): four corruptions at three severities each.

A corruption happens to the *photo*, as a camera or a channel would do it: it is applied to the
decoded RGB image at its own resolution, before the test transform resizes and crops it, and it
returns an RGB image of the same size. ``gaussian_noise`` adds Gaussian noise to the [0, 1] pixel
values; ``gaussian_blur`` blurs with a sigma proportional to the photo's shorter side (so a large
photo and its thumbnail are blurred alike relative to their content); ``jpeg`` re-encodes at a low
quality; ``brightness_contrast`` lowers the contrast and raises the brightness. Severity 1 is mild,
3 strong; the parameters are the table ``SEVERITY_TABLE``.

Every corrupted photo is a function of (seed, image index, corruption, severity) only: the noise
comes from a ``torch.Generator`` seeded from those four, so every model and every test size sees
the same corrupted photo, in any process and any DataLoader worker.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fixres.errors import UsageError

GAUSSIAN_NOISE = "gaussian_noise"
GAUSSIAN_BLUR = "gaussian_blur"
JPEG = "jpeg"
BRIGHTNESS_CONTRAST = "brightness_contrast"
#: The corruption names, in table order.
CORRUPTIONS = (GAUSSIAN_NOISE, GAUSSIAN_BLUR, JPEG, BRIGHTNESS_CONTRAST)
#: 1 mild, 2, 3 strong.
SEVERITIES = (1, 2, 3)
#: The parameter of each corruption at severities 1, 2, 3:
#: noise std on [0, 1] pixel values; blur sigma in pixels for a photo whose shorter side is
#: ``BLUR_REFERENCE_SIDE`` (scaled with the shorter side); JPEG quality; (contrast factor, brightness factor).
SEVERITY_TABLE: dict[str, tuple] = {
    GAUSSIAN_NOISE: (0.04, 0.08, 0.16),
    GAUSSIAN_BLUR: (0.75, 1.5, 3.0),
    JPEG: (30, 15, 7),
    BRIGHTNESS_CONTRAST: ((0.6, 1.1), (0.4, 1.2), (0.25, 1.3)),
}
#: The shorter side at which the blur sigmas of ``SEVERITY_TABLE`` are given in pixels.
BLUR_REFERENCE_SIDE = 224
#: The blur kernel reaches this many sigmas on each side of its centre.
BLUR_KERNEL_SIGMAS = 3
PIXEL_MAX = 255.0
#: Bytes of the digest that seeds the noise generator (a non-negative 63-bit seed).
SEED_BYTES = 8
SEED_MASK = (1 << 63) - 1


def corruption_set(names=CORRUPTIONS, severities=SEVERITIES) -> list[tuple[str, int]]:
    """(name, severity) of every corruption at every severity, names in ``CORRUPTIONS`` order; validated."""
    for name in names:
        check(name, SEVERITIES[0])
    for severity in severities:
        check(CORRUPTIONS[0], severity)
    return [(name, int(severity)) for name in names for severity in severities]


def check(name: str, severity: int) -> None:
    """Raise a one-line UsageError naming the valid choices for an unknown corruption or severity."""
    if name not in SEVERITY_TABLE:
        raise UsageError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise UsageError(f"unknown severity {severity!r} for {name}; choose from "
                         f"{', '.join(map(str, SEVERITIES))}")


def parameter(name: str, severity: int):
    """The value of ``SEVERITY_TABLE`` for ``name`` at ``severity``."""
    check(name, severity)
    return SEVERITY_TABLE[name][SEVERITIES.index(severity)]


def noise_seed(seed: int, index: int, name: str, severity: int) -> int:
    """The generator seed of one corrupted photo: a digest of (seed, index, name, severity), the same in every
    process."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(index)}/{name}/{int(severity)}".encode(), digest_size=SEED_BYTES)
    return int.from_bytes(digest.digest(), "little") & SEED_MASK


def blur_sigma(short_side: int, base_sigma: float) -> float:
    """The blur sigma for a photo whose shorter side is ``short_side``: ``base_sigma`` at ``BLUR_REFERENCE_SIDE``."""
    return base_sigma * short_side / BLUR_REFERENCE_SIDE


def blur_kernel(sigma: float, short_side: int) -> int:
    """An odd kernel size reaching ``BLUR_KERNEL_SIGMAS`` sigmas each side, no wider than the photo allows."""
    k = 2 * math.ceil(BLUR_KERNEL_SIGMAS * sigma) + 1
    return max(1, min(k, 2 * short_side - 1))


def _noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    noisy = x.float() / PIXEL_MAX + std * torch.randn(x.shape, generator=generator)
    return (noisy.clamp(0.0, 1.0) * PIXEL_MAX).round().to(torch.uint8)


def _blur(x: torch.Tensor, base_sigma: float) -> torch.Tensor:
    short = min(x.shape[-2:])
    sigma = blur_sigma(short, base_sigma)
    k = blur_kernel(sigma, short)
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encoded by PIL's libjpeg (torchvision's JPEG codec is deprecated since torchvision 0.29)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _brightness_contrast(x: torch.Tensor, factors: tuple[float, float]) -> torch.Tensor:
    contrast, brightness = factors
    return TF.adjust_brightness(TF.adjust_contrast(x, contrast), brightness)


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity: ``Corruption(name, severity, seed)(photo, index) -> photo``.

    Picklable (DataLoader workers). The photo is a PIL image; the result is an RGB PIL image of the
    same size, a function of (seed, index, name, severity) only.
    """

    name: str
    severity: int
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.name, self.severity)

    @property
    def parameter(self):
        return parameter(self.name, self.severity)

    def __call__(self, img: Image.Image, index: int) -> Image.Image:
        img = img.convert("RGB")
        if self.name == JPEG:
            return _jpeg(img, self.parameter)
        x = TF.pil_to_tensor(img)
        if self.name == GAUSSIAN_NOISE:
            g = torch.Generator().manual_seed(noise_seed(self.seed, index, self.name, self.severity))
            y = _noise(x, self.parameter, g)
        elif self.name == GAUSSIAN_BLUR:
            y = _blur(x, self.parameter)
        else:
            y = _brightness_contrast(x, self.parameter)
        return TF.to_pil_image(y, mode="RGB")

    def describe(self) -> str:
        """'gaussian_noise 2' style label."""
        return f"{self.name} {self.severity}"
