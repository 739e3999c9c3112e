"""Apparent object size under train and test pre-processing (paper section 3.1, figure 2).

Pure functions (numpy only): the closed form of eq. (5), a Monte-Carlo estimate that samples the
real RandomResizedCrop parameters (torchvision's retry and fallback rule) and the test crop, the
test size that makes apparent sizes match, and the inverse (train size for a target test size).

Imaging model: an object of apparent size r pixels in an H x W photo. RandomResizedCrop takes a
RoC of h x w pixels and resizes it to train_size x train_size, so the object is scaled by
train_size / sqrt(h w). The test pre-processing resizes the shorter side to ``resize`` and crops,
so the object is scaled by resize / min(H, W). The ratio r_test / r_train of these two factors
is what the analysis reports; < 1 means objects look smaller at test time.

The training augmentation decides the train factor: ``train`` is RandomResizedCrop over ``scale`` (the
paper's train DA); ``control`` (appendix D) resizes the shorter side to ``resize_for(train_size)`` and
takes a fixed-size random crop, so objects are scaled by resize / min(H, W) as at test time and the
ratio at test_size = train_size is exactly 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fixres.config import (
    DEFAULT_ANALYSIS_SAMPLES,
    DEFAULT_CROP_RATIO,
    DEFAULT_STRIDE,
    RRC_RATIO,
    RRC_SCALE,
    resize_for,
    validate_size,
)
from fixres.errors import UsageError

#: The training augmentations the analysis models: RandomResizedCrop (train DA) and appendix D's control.
RRC_AUGMENT = "train"
CONTROL_AUGMENT = "control"
TRAIN_AUGMENTS = (RRC_AUGMENT, CONTROL_AUGMENT)
#: torchvision's RandomResizedCrop tries this many samples before its centre-crop fallback.
RRC_ATTEMPTS = 10
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def round_to_stride(size: float, stride: int = DEFAULT_STRIDE) -> int:
    """Nearest positive multiple of ``stride`` (appendix B: avoid border and round-off effects)."""
    if stride <= 0:
        raise UsageError(f"stride must be positive, got {stride}")
    return max(stride, int(stride * math.floor(size / stride + 0.5)))


def scale_factor_F(scale: Sequence[float] = RRC_SCALE) -> float:
    """F of eq. (5): E[sigma] for sigma^2 ~ U[scale_min, scale_max] (sigma = sqrt of the RoC area fraction)."""
    lo, hi = float(scale[0]), float(scale[1])
    if not (0 < lo <= hi <= 1):
        raise UsageError(f"scale bounds must satisfy 0 < min <= max <= 1, got {scale}")
    if math.isclose(lo, hi):
        return math.sqrt(lo)
    s_lo, s_hi = math.sqrt(lo), math.sqrt(hi)
    return 2.0 / 3.0 * (s_hi ** 3 - s_lo ** 3) / (s_hi ** 2 - s_lo ** 2)


def check_train_augment(train_augment: str) -> str:
    if train_augment not in TRAIN_AUGMENTS:
        raise UsageError(f"unknown training augmentation {train_augment!r}; choose {' or '.join(TRAIN_AUGMENTS)}")
    return train_augment


def closed_form_ratio(*, train_size: int, test_size: int | None = None, crop_ratio: float = DEFAULT_CROP_RATIO,
                      scale: Sequence[float] = RRC_SCALE, train_augment: str = RRC_AUGMENT) -> float:
    """E[r_test / r_train]: F * test_resize / train_size under RandomResizedCrop (eq. 5; square images,
    aspect 1); test_resize / train_resize under the control augmentation (no scale change in training)."""
    validate_size(train_size, "train_size")
    test_size = train_size if test_size is None else test_size
    if check_train_augment(train_augment) == CONTROL_AUGMENT:
        return resize_for(test_size, crop_ratio) / resize_for(train_size, crop_ratio)
    return scale_factor_F(scale) * resize_for(test_size, crop_ratio) / train_size


def recommend_test_size(*, train_size: int, crop_ratio: float = DEFAULT_CROP_RATIO,
                        scale: Sequence[float] = RRC_SCALE, stride: int = DEFAULT_STRIDE,
                        ratio: float | None = None, train_augment: str = RRC_AUGMENT) -> dict:
    """Test size whose apparent object sizes match training (section 4.1).

    Crop and resize are scaled together by alpha = 1 / E[r_test / r_train] (measured at
    test_size = train_size), keeping the crop ratio, then rounded to a multiple of ``stride``.
    """
    if ratio is None:
        ratio = closed_form_ratio(train_size=train_size, crop_ratio=crop_ratio, scale=scale,
                                  train_augment=train_augment)
    e = ratio
    alpha = 1.0 / e
    exact = train_size * alpha
    return {"ratio": e, "alpha": alpha, "test_size_exact": exact, "test_size": round_to_stride(exact, stride)}


def recommend_train_size(*, test_size: int, crop_ratio: float = DEFAULT_CROP_RATIO,
                         scale: Sequence[float] = RRC_SCALE, stride: int = DEFAULT_STRIDE,
                         train_augment: str = RRC_AUGMENT) -> dict:
    """Inverse: the train size at which objects look as large in training as at ``test_size``.

    Solves F * resize_for(test_size) / train_size = 1 for train_size (RandomResizedCrop); under the
    control augmentation the sizes match when they are equal.
    """
    if check_train_augment(train_augment) == CONTROL_AUGMENT:
        return {"train_size_exact": float(test_size), "train_size": round_to_stride(test_size, stride)}
    exact = scale_factor_F(scale) * resize_for(test_size, crop_ratio)
    return {"train_size_exact": exact, "train_size": round_to_stride(exact, stride)}


# --------------------------------------------------------------------------- Monte Carlo

def sample_rrc_boxes(heights: np.ndarray, widths: np.ndarray, rng: np.random.Generator, *,
                     scale: Sequence[float] = RRC_SCALE,
                     ratio: Sequence[float] = RRC_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised torchvision ``RandomResizedCrop.get_params``: RoC heights and widths, one per image.

    Each image gets up to ``RRC_ATTEMPTS`` tries of (area ~ U(scale) * H W, log aspect ~ U(log ratio));
    the first whose rounded w x h fits wins; otherwise the centre-crop fallback with the aspect clamped.
    """
    heights = np.asarray(heights, dtype=np.float64)
    widths = np.asarray(widths, dtype=np.float64)
    n = heights.shape[0]
    area = heights * widths
    out_h = np.zeros(n)
    out_w = np.zeros(n)
    done = np.zeros(n, dtype=bool)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(RRC_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1], size=n)
        aspect = np.exp(rng.uniform(log_lo, log_hi, size=n))
        w = np.round(np.sqrt(target * aspect))
        h = np.round(np.sqrt(target / aspect))
        ok = (~done) & (w > 0) & (h > 0) & (w <= widths) & (h <= heights)
        out_h[ok], out_w[ok] = h[ok], w[ok]
        done |= ok
    # Fallback: whole image, aspect clamped into [ratio_min, ratio_max] (as torchvision does).
    rest = ~done
    in_ratio = widths / heights
    fw, fh = widths.copy(), heights.copy()
    too_tall = in_ratio < min(ratio)
    too_wide = in_ratio > max(ratio)
    fh = np.where(too_tall, np.round(fw / min(ratio)), fh)
    fw = np.where(too_wide, np.round(fh * max(ratio)), fw)
    out_h[rest], out_w[rest] = fh[rest], fw[rest]
    return out_h, out_w


@dataclass
class MonteCarloResult:
    mean: float
    std: float
    quantiles: dict
    train_area_fraction: np.ndarray
    test_area_fraction: np.ndarray
    ratios: np.ndarray

    def summary(self) -> dict:
        return {"mean": self.mean, "std": self.std, "quantiles": self.quantiles,
                "train_area_fraction_mean": float(self.train_area_fraction.mean()),
                "test_area_fraction_mean": float(self.test_area_fraction.mean())}


def monte_carlo_ratio(*, train_size: int, test_size: int | None = None, crop_ratio: float = DEFAULT_CROP_RATIO,
                      image_sizes: Sequence[tuple[int, int]] = ((500, 500),), samples: int = DEFAULT_ANALYSIS_SAMPLES,
                      seed: int = 0, scale: Sequence[float] = RRC_SCALE,
                      ratio: Sequence[float] = RRC_RATIO, train_augment: str = RRC_AUGMENT) -> MonteCarloResult:
    """Sample photos (uniformly from ``image_sizes``, given as (width, height)) and their train RoCs.

    Returns the distribution of r_test / r_train and the RoC area fractions of figure 2. Under the control
    augmentation the train RoC is the fixed crop seen through the train resize.
    """
    validate_size(train_size, "train_size")
    test_size = train_size if test_size is None else test_size
    resize = resize_for(test_size, crop_ratio)
    if not image_sizes:
        raise UsageError("image_sizes is empty")
    sizes = np.asarray(image_sizes, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or (sizes <= 0).any():
        raise UsageError("image sizes must be positive (width, height) pairs")
    rng = np.random.default_rng(seed)
    pick = sizes[rng.integers(0, len(sizes), size=samples)]
    widths, heights = pick[:, 0], pick[:, 1]
    short = np.minimum(heights, widths)
    if check_train_augment(train_augment) == CONTROL_AUGMENT:
        h = w = np.minimum(train_size / resize_for(train_size, crop_ratio) * short, short)
    else:
        h, w = sample_rrc_boxes(heights, widths, rng, scale=scale, ratio=ratio)
    s_train = train_size / np.sqrt(h * w)
    s_test = resize / short
    ratios = s_test / s_train
    # Test RoC: the crop seen through the resize, as a fraction of the photo's area.
    roc_side = np.minimum(test_size / resize * short, short)
    test_area = roc_side ** 2 / (heights * widths)
    train_area = h * w / (heights * widths)
    q = {str(p): float(np.quantile(ratios, p)) for p in QUANTILES}
    return MonteCarloResult(float(ratios.mean()), float(ratios.std()), q, train_area, test_area, ratios)


def parse_image_sizes(text: str) -> list[tuple[int, int]]:
    """Parse ``"500x375,375x500"`` into [(500, 375), (375, 500)] (width x height)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            w, h = (int(v) for v in part.split("x"))
        except ValueError:
            raise UsageError(f"bad image size {part!r}: expected WIDTHxHEIGHT, e.g. 500x375") from None
        if w <= 0 or h <= 0:
            raise UsageError(f"bad image size {part!r}: sides must be positive")
        sizes.append((w, h))
    if not sizes:
        raise UsageError("no image sizes given")
    return sizes


def analyze(*, train_size: int, crop_ratio: float = DEFAULT_CROP_RATIO, stride: int = DEFAULT_STRIDE,
            image_sizes: Sequence[tuple[int, int]] | None = None, samples: int = DEFAULT_ANALYSIS_SAMPLES,
            seed: int = 0, target_test_size: int | None = None, train_augment: str = RRC_AUGMENT,
            scale: Sequence[float] = RRC_SCALE) -> dict:
    """Everything ``fixres analyze`` reports, as a JSON-ready dict; ``train_augment`` and ``scale`` say how the
    model was trained (RandomResizedCrop over ``scale``, or appendix D's control)."""
    aug = {"train_augment": check_train_augment(train_augment), "scale": tuple(scale)}
    closed = closed_form_ratio(train_size=train_size, crop_ratio=crop_ratio, **aug)
    rec = recommend_test_size(train_size=train_size, crop_ratio=crop_ratio, stride=stride, **aug)
    rrc = train_augment == RRC_AUGMENT
    result: dict = {
        "train_size": train_size,
        "crop_ratio": crop_ratio,
        "test_resize": resize_for(train_size, crop_ratio),
        "stride": stride,
        "train_augment": train_augment,
        "train_scale": list(aug["scale"]) if rrc else None,
        "F": scale_factor_F(scale) if rrc else None,
        "ratio_closed_form": closed,
        "ratio": closed,
        "recommended_test_size": rec["test_size"],
        "recommended_test_size_exact": rec["test_size_exact"],
        "alpha": rec["alpha"],
    }
    if image_sizes is not None:
        mc = monte_carlo_ratio(train_size=train_size, crop_ratio=crop_ratio, image_sizes=image_sizes,
                               samples=samples, seed=seed, **aug)
        mc_rec = recommend_test_size(train_size=train_size, crop_ratio=crop_ratio, stride=stride, ratio=mc.mean)
        # The closed form assumes aspect 1; the same sampler with aspect fixed isolates that assumption.
        mc_aspect1 = monte_carlo_ratio(train_size=train_size, crop_ratio=crop_ratio, image_sizes=image_sizes,
                                       samples=samples, seed=seed, ratio=(1.0, 1.0), **aug)
        result["monte_carlo"] = {**mc.summary(), "mean_aspect1": mc_aspect1.mean,
                                 "samples": samples, "image_sizes_used": len(image_sizes),
                                 "recommended_test_size": mc_rec["test_size"],
                                 "recommended_test_size_exact": mc_rec["test_size_exact"]}
        result["_mc"] = mc  # stripped before JSON output; kept for plotting
    if target_test_size is not None:
        inv = recommend_train_size(test_size=target_test_size, crop_ratio=crop_ratio, stride=stride, **aug)
        result["for_test_size"] = {"test_size": target_test_size, **inv}
    return result
