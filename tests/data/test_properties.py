"""Property tests (hypothesis): crops inside the image, sizes as asked, monotone ratios."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fixres.config import DataConfig
from fixres.data import transforms as T
from fixres.method import analysis

CFG = DataConfig(train_size=32)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE_FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(min_value=1, max_value=160)
sizes = st.integers(min_value=1, max_value=96)
crop_ratios = st.floats(min_value=0.2, max_value=1.0, allow_nan=False)
train_sizes = st.integers(min_value=16, max_value=1024)


def coordinate_image(w: int, h: int) -> Image.Image:
    """Every pixel unique within 256x256: R = x, G = y (so a crop can be located from its pixels)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = (np.arange(w) % 256)[None, :]
    arr[..., 1] = (np.arange(h) % 256)[:, None]
    arr[..., 2] = 7
    return Image.fromarray(arr)


# --------------------------------------------------------------------------- transforms


@IMAGE_FAST
@given(w=sides, h=sides, test_size=sizes, crop_ratio=crop_ratios)
def test_test_transform_size_as_asked(w, h, test_size, crop_ratio):
    x = T.test_transform(T.geometry_for(test_size, CFG, crop_ratio), CFG)(coordinate_image(w, h))
    assert x.shape == (3, test_size, test_size)
    assert torch.isfinite(x).all()


@IMAGE_FAST
@given(w=st.integers(8, 200), h=st.integers(8, 200), test_size=st.integers(4, 64), crop_ratio=crop_ratios)
def test_test_geometry_resize_then_inside_crop(w, h, test_size, crop_ratio):
    """Shorter side -> resize_for(); the crop lies inside the resized image, centred within a pixel."""
    geo = T.resize_center_crop(T.geometry_for(test_size, CFG, crop_ratio))
    resized = geo.transforms[0](coordinate_image(w, h))
    resize = T.resize_for(test_size, crop_ratio)
    assert min(resized.size) == resize
    out = geo(coordinate_image(w, h))
    assert out.size == (test_size, test_size)
    rw, rh = resized.size
    assert test_size <= rw and test_size <= rh  # crop_ratio <= 1: nothing to pad
    # Centred: the output is the resized image cut at an offset within half a pixel of the exact centre.
    got = np.asarray(out)
    offsets = [(left, top) for left in _near((rw - test_size) / 2) for top in _near((rh - test_size) / 2)
               if np.array_equal(np.asarray(resized.crop((left, top, left + test_size, top + test_size))), got)]
    assert offsets, f"the crop of {rw}x{rh} to {test_size} is not at the centre"


def _near(exact: float) -> list[int]:
    """Integer offsets within half a pixel of ``exact`` (both neighbours of a .5)."""
    return sorted({int(np.floor(exact + 0.5)), int(np.ceil(exact - 0.5))})


@FAST
@given(w=st.integers(1, 400), h=st.integers(1, 400), size=st.integers(1, 64),
       max_shift=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_shifted_crop_inside_image(w, h, size, max_shift, seed):
    """DA2's crop never leaves the image when the image is at least the crop size (as after the resize)."""
    w, h = max(w, size), max(h, size)
    img = torch.zeros(3, h, w)
    img[0] = torch.arange(w, dtype=torch.float32)[None, :]
    img[1] = torch.arange(h, dtype=torch.float32)[:, None]
    random.seed(seed)
    out = T.ShiftedCenterCrop(size, max_shift)(img)
    assert out.shape == (3, size, size)
    left, top = int(out[0, 0, 0]), int(out[1, 0, 0])
    assert 0 <= left <= w - size and 0 <= top <= h - size
    slack = (w - size) / 2
    assert abs(left - slack) <= max_shift * slack + 1
    assert abs(top - (h - size) / 2) <= 1  # never shifted vertically


@IMAGE_FAST
@given(w=sides, h=sides, train_size=st.integers(1, 64), seed=st.integers(0, 2 ** 16))
def test_train_transform_size_as_asked(w, h, train_size, seed):
    torch.manual_seed(seed)
    x = T.train_transform(train_size=train_size, cfg=CFG)(coordinate_image(w, h))
    assert x.shape == (3, train_size, train_size)


@FAST
@given(test_size=st.integers(1, 2048), crop_ratio=crop_ratios)
def test_resize_for_bounds(test_size, crop_ratio):
    r = T.resize_for(test_size, crop_ratio)
    assert r >= test_size
    assert abs(r - test_size / crop_ratio) <= 0.5 + 1e-9 or r == test_size
    # One rule: analysis models exactly the resize the test transform applies (not a copy of the formula).
    assert analysis.resize_for is T.resize_for
    resize_op = T.resize_center_crop(T.geometry_for(test_size, CFG, crop_ratio)).transforms[0]
    assert list(resize_op.size) == [r]


@FAST
@given(a=st.integers(1, 2048), b=st.integers(1, 2048), c1=crop_ratios, c2=crop_ratios)
def test_resize_for_monotone(a, b, c1, c2):
    lo, hi = sorted((a, b))
    assert T.resize_for(lo, c1) <= T.resize_for(hi, c1)  # larger test size, larger resize
    small_c, large_c = sorted((c1, c2))
    assert T.resize_for(a, large_c) <= T.resize_for(a, small_c)  # larger crop ratio, smaller resize


# --------------------------------------------------------------------------- analysis


@FAST
@given(train=train_sizes, t1=train_sizes, t2=train_sizes, crop_ratio=crop_ratios)
def test_closed_form_increases_with_test_size(train, t1, t2, crop_ratio):
    lo, hi = sorted((t1, t2))
    r_lo = analysis.closed_form_ratio(train_size=train, test_size=lo, crop_ratio=crop_ratio)
    r_hi = analysis.closed_form_ratio(train_size=train, test_size=hi, crop_ratio=crop_ratio)
    assert r_lo <= r_hi


@FAST
@given(a=train_sizes, b=train_sizes, test=train_sizes, crop_ratio=crop_ratios)
def test_closed_form_decreases_with_train_size(a, b, test, crop_ratio):
    lo, hi = sorted((a, b))
    r_small_train = analysis.closed_form_ratio(train_size=lo, test_size=test, crop_ratio=crop_ratio)
    r_large_train = analysis.closed_form_ratio(train_size=hi, test_size=test, crop_ratio=crop_ratio)
    assert r_large_train <= r_small_train


@FAST
@given(a=train_sizes, b=train_sizes, crop_ratio=crop_ratios, stride=st.sampled_from([1, 8, 16, 32]))
def test_recommend_test_size_monotone_in_train_size(a, b, crop_ratio, stride):
    lo, hi = sorted((a, b))
    r_lo = analysis.recommend_test_size(train_size=lo, crop_ratio=crop_ratio, stride=stride)
    r_hi = analysis.recommend_test_size(train_size=hi, crop_ratio=crop_ratio, stride=stride)
    assert r_lo["test_size"] <= r_hi["test_size"]
    assert r_lo["test_size_exact"] <= r_hi["test_size_exact"] + 1e-9
    assert r_lo["test_size"] % stride == 0
    # FixRes always says: test at a higher resolution than you trained at (objects look smaller at test time).
    assert r_lo["test_size_exact"] > lo * 0.99 or crop_ratio < 0.75


@FAST
@given(a=train_sizes, b=train_sizes, crop_ratio=crop_ratios)
def test_recommend_train_size_monotone_in_test_size(a, b, crop_ratio):
    lo, hi = sorted((a, b))
    assert (analysis.recommend_train_size(test_size=lo, crop_ratio=crop_ratio)["train_size_exact"]
            <= analysis.recommend_train_size(test_size=hi, crop_ratio=crop_ratio)["train_size_exact"])


@FAST
@given(lo1=st.floats(0.01, 1.0), lo2=st.floats(0.01, 1.0))
def test_F_increases_with_scale_min(lo1, lo2):
    a, b = sorted((lo1, lo2))
    assert analysis.scale_factor_F((a, 1.0)) <= analysis.scale_factor_F((b, 1.0)) + 1e-12
    assert np.sqrt(a) - 1e-12 <= analysis.scale_factor_F((a, 1.0)) <= 1.0 + 1e-12  # E[sigma] within its range


@FAST
@given(size=st.floats(0.1, 5000), stride=st.integers(1, 64))
def test_round_to_stride_properties(size, stride):
    r = analysis.round_to_stride(size, stride)
    assert r % stride == 0 and r >= stride
    assert abs(r - size) <= stride / 2 + 1e-9 or r == stride


@FAST
@given(heights=st.lists(st.integers(1, 2000), min_size=1, max_size=30),
       widths=st.lists(st.integers(1, 2000), min_size=1, max_size=30), seed=st.integers(0, 2 ** 32 - 1),
       scale_lo=st.floats(0.01, 1.0))
def test_rrc_boxes_inside_image(heights, widths, seed, scale_lo):
    n = min(len(heights), len(widths))
    h_img = np.array(heights[:n], dtype=np.float64)
    w_img = np.array(widths[:n], dtype=np.float64)
    rng = np.random.default_rng(seed)
    h, w = analysis.sample_rrc_boxes(h_img, w_img, rng, scale=(scale_lo, 1.0))
    assert (h >= 1).all() and (w >= 1).all()
    assert (h <= h_img).all() and (w <= w_img).all()
    assert np.array_equal(h, np.round(h)) and np.array_equal(w, np.round(w))


@settings(max_examples=10, deadline=None)
@given(w=st.integers(50, 1000), h=st.integers(50, 1000), train=st.sampled_from([128, 224]))
def test_monte_carlo_ratios_positive_and_bounded(w, h, train):
    mc = analysis.monte_carlo_ratio(train_size=train, image_sizes=[(w, h)], samples=2000, seed=0)
    assert np.all(mc.ratios > 0)
    assert np.all((mc.train_area_fraction > 0) & (mc.train_area_fraction <= 1 + 1e-9))
    assert np.all((mc.test_area_fraction > 0) & (mc.test_area_fraction <= 1 + 1e-9))
    assert mc.quantiles["0.05"] <= mc.quantiles["0.5"] <= mc.quantiles["0.95"]


@pytest.mark.parametrize("train", [64, 224])
def test_monte_carlo_monotone_in_test_size(train):
    means = [analysis.monte_carlo_ratio(train_size=train, test_size=t, samples=3000, seed=0).mean
             for t in (train, int(train * 1.25), int(train * 1.5))]
    assert means == sorted(means)
