"""Reduced-size JPEG decoding: decode only the pixels a size needs.

Where no reduction applies the output is bit-identical to a full decode (same code path); where one
applies, the decoded image keeps at least the needed shorter side, is the smallest power-of-two
reduction that does, and the network input stays close to the full-decode one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fixres.config import DataConfig, resize_for
from fixres.data import images
from fixres.data import transforms as T
from fixres.data.images import jpeg_reduction, load_rgb
from fixres.data.loaders import ImageDataset

CFG = DataConfig(train_size=64, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
#: Mean absolute difference (normalised units, range 2) allowed between reduced and full decode.
CLOSE = 0.04


def smooth_photo(path, w: int, h: int, *, exif_orientation: int | None = None, seed: int = 0) -> str:
    """A photo-like JPEG: gradients, soft discs and mild noise (no detail finer than a few pixels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 120 + 60], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(w, h)
        disc = np.clip(1.5 - np.hypot(xx - cx, yy - cy) / r, 0, 1)[..., None]
        arr = arr * (1 - disc) + rng.uniform(0, 255, 3) * disc
    arr += rng.normal(0, 2, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    img.save(path, quality=95, **kw)
    return str(path)


def _both(path, transform, seed: int = 0):
    """(full-decode output, reduced-decode output) of one photo, from the same random state."""
    outs = []
    for reduced in (False, True):
        torch.manual_seed(seed)
        outs.append(ImageDataset([(path, 0)], transform, reduced_decode=reduced)[0][0])
    return outs


@pytest.mark.parametrize("short,needed,k", [(375, 146, 2), (375, 256, 1), (1000, 100, 8), (1000, 300, 2),
                                            (400, 100, 4), (399, 100, 2), (1000, None, 1), (50, 64, 1)])
def test_jpeg_reduction_is_the_smallest_power_of_two_keeping_the_size(short, needed, k):
    assert jpeg_reduction(short, needed) == k


def test_no_reduction_applies_output_is_identical(tmp_path):
    small = smooth_photo(tmp_path / "small.jpg", 84, 70)  # shorter side 70 < 2 x resize 37 (and 73)
    png = tmp_path / "big.png"
    Image.open(smooth_photo(tmp_path / "big.jpg", 640, 480)).save(png)  # not a JPEG: never reduced
    test = T.test_transform(T.geometry_for(64, CFG, 0.875), CFG)
    sweep = T.MultiView([T.test_transform(T.geometry_for(s, CFG, 0.875), CFG) for s in (32, 64)])
    train = T.train_transform(train_size=64, cfg=CFG, color_jitter=True)
    for path in (small, str(png)):
        for t in (test, train):
            full, reduced = _both(path, t, seed=3)
            assert torch.equal(full, reduced)
        full, reduced = _both(path, sweep)
        assert all(torch.equal(a, b) for a, b in zip(full, reduced))


def test_reduced_decode_keeps_the_needed_side(tmp_path):
    path = smooth_photo(tmp_path / "p.jpg", 640, 480)
    for needed, expect in ((73, (160, 120)), (146, (320, 240)), (256, (640, 480)), (60, (80, 60))):
        img = load_rgb(path, need=lambda size: needed)
        assert img.size == expect
        assert min(img.size) >= needed and (expect == (640, 480) or min(img.size) // 2 < needed)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_reduced_test_transform_is_close_to_full_decode(tmp_path, size):
    path = smooth_photo(tmp_path / "p.jpg", 800, 600)
    assert jpeg_reduction(600, resize_for(size, 0.875)) > 1  # a reduction really applies
    full, reduced = _both(path, T.test_transform(T.geometry_for(size, CFG, 0.875), CFG))
    assert full.shape == reduced.shape == (3, size, size)
    assert (full - reduced).abs().mean() < CLOSE


def test_exif_rotated_photo_reduced_like_full(tmp_path):
    path = smooth_photo(tmp_path / "r.jpg", 800, 600, exif_orientation=6)  # upright 600 x 800
    assert load_rgb(path).size == (600, 800)
    assert load_rgb(path, need=lambda size: 146).size == (150, 200)  # 600 // 4 = 150 >= 146
    seen = []
    load_rgb(path, need=lambda size: seen.append(size) or 146)
    assert seen == [(600, 800)]  # the plan sees the upright size, as the transform will
    full, reduced = _both(path, T.test_transform(T.geometry_for(64, CFG, 0.875), CFG))
    assert (full - reduced).abs().mean() < CLOSE
    full, reduced = _both(path, T.train_transform(train_size=32, cfg=CFG, scale=(0.9, 1.0)), seed=1)
    assert (full - reduced).abs().mean() < CLOSE


def test_random_resized_crop_draws_first_then_decodes_what_the_crop_needs(tmp_path, monkeypatch):
    path = smooth_photo(tmp_path / "p.jpg", 800, 600)
    sizes = []
    real = images.load_rgb

    def spy(p, need=None):
        img = real(p, need=need)
        sizes.append(img.size)
        return img

    monkeypatch.setattr("fixres.data.loaders.load_rgb", spy)
    big_crop = T.train_transform(train_size=64, cfg=CFG, scale=(0.8, 1.0))
    for seed in range(4):
        full, reduced = _both(path, big_crop, seed=seed)
        assert (full - reduced).abs().mean() < CLOSE
        torch.manual_seed(seed)
        after_full = (ImageDataset([(path, 0)], big_crop, reduced_decode=False)[0], torch.rand(3))[1]
        torch.manual_seed(seed)
        after_reduced = (ImageDataset([(path, 0)], big_crop)[0], torch.rand(3))[1]
        assert torch.equal(after_full, after_reduced)  # the same random numbers were drawn
    reduced_sizes = sizes[1::2][:4]
    assert all(s[1] < 600 for s in reduced_sizes), reduced_sizes  # decoded smaller than 800 x 600
    # ... but never below what the crop needs: its shorter side keeps >= 64 pixels.
    plan = T.decode_plan(big_crop)
    torch.manual_seed(0)
    needed = plan.need((800, 600))
    crop_short = min(plan.params["height"], plan.params["width"])
    assert needed * crop_short >= 64 * 600


def test_sweep_decodes_once_per_distinct_reduction_and_each_view_equals_its_single_transform(tmp_path, monkeypatch):
    path = smooth_photo(tmp_path / "p.jpg", 1200, 900)
    needs = []
    real = images.load_rgb

    def spy(p, need=None):
        needs.append(need((1200, 900)) if need else None)
        return real(p, need=need)

    monkeypatch.setattr("fixres.data.loaders.load_rgb", spy)
    sizes = (32, 64, 128)  # resize 37, 73 -> 1/8 of 900 = 112 suffices; 146 -> 1/4 (225)
    views = [T.test_transform(T.geometry_for(s, CFG, 0.875), CFG) for s in sizes]
    out = ImageDataset([(path, 0)], T.MultiView(views))[0][0]
    assert needs == [resize_for(128, 0.875), resize_for(64, 0.875)]  # the finest decode first, then 1/8 once
    assert [x.shape[-1] for x in out] == list(sizes)
    for view, x in zip(views, out):
        alone = ImageDataset([(path, 0)], T.MultiView([view]))[0][0][0]
        assert torch.equal(alone, x)  # exactly the pixels the size gets when evaluated alone
    full = ImageDataset([(path, 0)], T.MultiView(views), reduced_decode=False)[0][0]
    assert all((a - b).abs().mean() < CLOSE for a, b in zip(full, out))


def test_sweep_off_vs_on_differs_only_in_views_that_are_reduced(tmp_path):
    """Reduced decoding changes a view's input only when that view's JPEG reduction is > 1 for the photo."""
    sizes = (32, 64, 96, 128, 160)  # resize 37, 73, 110, 146, 183 on a 300 px side: 1/8, 1/4, 1/2, 1/2, 1
    for w, h, rot in ((400, 300, None), (300, 400, None), (400, 300, 6), (200, 150, None)):
        path = smooth_photo(tmp_path / f"{w}x{h}_{rot}.jpg", w, h, exif_orientation=rot, seed=w + h)
        views = T.MultiView([T.test_transform(T.geometry_for(s, CFG, 0.875), CFG) for s in sizes])
        full, reduced = _both(path, views)
        for s, a, b in zip(sizes, full, reduced):
            if jpeg_reduction(min(w, h), resize_for(s, 0.875)) == 1:
                assert torch.equal(a, b), (w, h, s)
            else:
                assert not torch.equal(a, b) and (a - b).abs().mean() < CLOSE, (w, h, s)


def test_box_resize_crop_matches_resize_then_crop(tmp_path):
    """The reduced path cuts resize + centre crop in one PIL resize: the same pixels within a few levels."""
    for w, h in ((300, 200), (200, 300), (257, 256)):
        img = Image.open(smooth_photo(tmp_path / f"{w}x{h}.jpg", w, h)).convert("RGB")
        geo = T.resize_center_crop(T.geometry_for(96, CFG, 0.875))
        a = np.asarray(geo(img), dtype=int)
        b = np.asarray(T._resize_box_crop(img, resize_for(96, 0.875), 96, T.interpolation_mode("bicubic")), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 4 and np.abs(a - b).mean() < 0.5


def test_skipped_photo_gives_back_the_crop_random_numbers(tmp_path):
    good = smooth_photo(tmp_path / "p.jpg", 800, 600)
    data = open(good, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageDataset([(str(tmp_path / "cut.jpg"), 0)], T.train_transform(train_size=32, cfg=CFG))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    item = ds[0]
    assert type(item).__name__ == "Skipped" and "truncated" in item.reason
    assert torch.equal(torch.rand(4), expected)


# ------------------------------------------------------------------ a sweep row equals the single-size eval

SWEEP = (32, 64, 96, 128, 160)  # on 400 x 300 photos: JPEG reductions 1/8, 1/4, 1/2, 1/2, 1 (full)


def _photos(tmp_path) -> list[tuple[str, int]]:
    shapes = [(400, 300, None), (300, 400, None), (400, 300, 6), (420, 320, None), (200, 150, None), (640, 480, None)]
    return [(smooth_photo(tmp_path / f"p{i}.jpg", w, h, exif_orientation=rot, seed=i), i % 3)
            for i, (w, h, rot) in enumerate(shapes)]


def _sharp(tiny_model):
    """The tiny model with a sharpened head, so small input changes move its log-probabilities visibly."""
    with torch.no_grad():
        tiny_model.model.fc.weight.mul_(20.0)
    return tiny_model


def _eval(bundle, samples, sizes, **kw):
    from fixres.method.evaluate import evaluate
    from fixres.runtime.engine import Precision
    return evaluate(bundle.model, samples, bundle.data_config, test_sizes=sizes, batch_size=4, workers=0,
                    precision=Precision(False, None, False), progress=False, keep_log_probs=True, **kw)


@pytest.mark.parametrize("ten_crop", [False, True])
def test_sweep_row_equals_evaluate_at_that_single_size(tmp_path, tiny_model, ten_crop):
    """The one-pass sweep's row at S is exactly ``evaluate`` at S alone (top-1, loss, per image)."""
    bundle, samples = _sharp(tiny_model), _photos(tmp_path)
    ratio = bundle.data_config.crop_ratio
    assert len({jpeg_reduction(300, resize_for(s, ratio)) for s in SWEEP}) >= 3  # the sizes need different decodes
    sweep = _eval(bundle, samples, list(SWEEP), ten_crop=ten_crop, ensembles=[(32, 160), (64, 96)])
    for row in sweep.rows:
        alone = _eval(bundle, samples, [row.test_size], ten_crop=ten_crop)
        (one,) = alone.rows
        for key in ("top1", "top5", "loss", "correct", "correct5", "n", "ece"):
            assert getattr(row, key) == getattr(one, key), (row.test_size, key)
        key = f"{row.test_size}@{ratio:g}"
        assert np.array_equal(sweep.arrays.log_probs[key], alone.arrays.log_probs[key]), row.test_size
    # an ensemble row is the average softmax of the members' single-size evaluations
    for ens, members in zip(sweep.ensembles, ((32, 160), (64, 96))):
        lps = torch.stack([torch.from_numpy(sweep.arrays.log_probs[f"{m}@{ratio:g}"]) for m in members])
        avg = lps.logsumexp(0) - np.log(len(members))
        labels = torch.tensor([label for _, label in samples])
        assert ens.correct == int((avg.argmax(1) == labels).sum())
        assert ens.loss == pytest.approx(float(-avg.gather(1, labels[:, None]).double().mean()), rel=1e-6)


def test_reduced_decode_off_vs_on_differs_only_where_a_reduction_applies(tmp_path, tiny_model):
    """With reduced decoding off every view decodes in full; on, only views whose reduction is > 1 change."""
    bundle, samples = _sharp(tiny_model), _photos(tmp_path)
    ratio = bundle.data_config.crop_ratio
    on = _eval(bundle, samples, list(SWEEP))
    off = _eval(bundle, samples, list(SWEEP), reduced_decode=False)
    shorts = [min(Image.open(p).size) for p, _ in samples]
    for s in SWEEP:
        key = f"{s}@{ratio:g}"
        a, b = on.arrays.log_probs[key], off.arrays.log_probs[key]
        for i, short in enumerate(shorts):
            if jpeg_reduction(short, resize_for(s, ratio)) == 1:
                assert np.array_equal(a[i], b[i]), (s, i)
            else:  # same photo at 1/2..1/8 decode: close, not identical
                assert not np.array_equal(a[i], b[i]) and np.abs(a[i] - b[i]).max() < 0.5, (s, i)


# ------------------------------------------------------------------ exact geometry of a reduced decode

def _boxes(monkeypatch) -> list:
    """Record the ``box`` of every PIL resize (the crop the reduced path resamples)."""
    seen = []
    real = Image.Image.resize

    def spy(self, size, resample=None, box=None, reducing_gap=None):
        seen.append((self.size, box))
        return real(self, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return seen


def test_reduced_centre_crop_box_is_the_full_photos_box_divided_by_the_reduction(tmp_path, monkeypatch):
    """A 500 x 375 JPEG decoded at 1/2 is 250 x 188 (libjpeg rounds up), not 250 x 187.5: the crop
    box must be torchvision's box on the *full* photo divided by 2, not one recomputed from the
    rounded-up size (which samples 0.3 % too tall and up to a pixel off at the far edge)."""
    path = smooth_photo(tmp_path / "p.jpg", 500, 375)
    boxes = _boxes(monkeypatch)
    ImageDataset([(path, 0)], T.test_transform(T.geometry_for(128, CFG, 0.875), CFG))[0]
    (decoded, box), = boxes
    assert decoded == (250, 188)
    # torchvision on the full photo: resize the shorter side to 146 -> 194 x 146, crop 128 at (33, 9).
    sx, sy = 500 / 194, 375 / 146
    assert box == pytest.approx((33 * sx / 2, 9 * sy / 2, 161 * sx / 2, 137 * sy / 2), abs=1e-9)


def test_reduced_random_resized_crop_box_is_the_drawn_crop_divided_by_the_reduction(tmp_path, monkeypatch):
    path = smooth_photo(tmp_path / "p.jpg", 501, 377)  # odd sides: every reduction rounds up
    t = T.train_transform(train_size=48, cfg=CFG, scale=(0.6, 1.0))
    plan = T.decode_plan(t)
    torch.manual_seed(0)
    img = load_rgb(path, need=plan.need)
    k = 501 / img.width
    assert img.size == (-(-501 // round(k)), -(-377 // round(k))) and round(k) > 1
    boxes = _boxes(monkeypatch)
    plan.finish(img)
    p = plan.params
    expected = tuple(v / round(k) for v in (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]))
    assert boxes[0][1] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("full,decoded,k", [((500, 375), (250, 188), 2), ((501, 377), (63, 48), 8),
                                            ((640, 480), (640, 480), 1), ((17, 9), (3, 2), 8),
                                            ((100, 100), (30, 30), 100 / 30)])
def test_decoded_reduction_undoes_libjpegs_rounding(full, decoded, k):
    assert images.decoded_reduction(full, decoded) == pytest.approx(k)


def test_reduced_decode_stays_within_two_grey_levels_of_a_full_decode_on_real_photos(shared_data):
    """lite0's pre-processing at 128 px on 40 ImageNet photos: mean |difference| from the full decode.

    Measured over all 1,000 photos: 1.58 grey levels with the exact box, 3.11 with a box recomputed
    from the rounded-up decoded size (the predictions of lite0 then differ on 47 vs 55 photos).
    """
    from fixres.data.folders import resolve_split, scan_folder
    index = scan_folder(resolve_split(shared_data / "imagenet-sample", "val"), num_classes=1000)
    samples = index.samples[::25]
    t = T.test_transform(T.geometry_for(128, CFG, 0.875), CFG)
    diffs = []
    for path, _ in samples:
        full, reduced = _both(path, t)
        diffs.append(float((full - reduced).abs().mean()) * 127.5)  # normalised units (std 0.5) -> grey levels
    assert 0.5 < sum(diffs) / len(diffs) < 2.0, diffs


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_full_decode_flag_turns_reduced_decoding_off_from_the_cli(tmp_path, capsys, monkeypatch, command):
    """``--full-decode``: every JPEG decoded at full size (bit-exact with torchvision's path)."""
    import json

    from helpers import save_tiny_checkpoint
    from helpers.cli import cli

    from fixres.method import evaluate as ev
    for c in range(3):
        (tmp_path / "data" / "val" / f"c{c}").mkdir(parents=True)
        smooth_photo(tmp_path / "data" / "val" / f"c{c}" / "p.jpg", 320, 240, seed=c)
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    seen = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **kw: seen.append(kw["reduced_decode"]) or real(*a, **kw))
    sizes = ["--test-size", "32"] if command == "eval" else ["--test-sizes", "32,64"]
    base = [command, "--data", tmp_path / "data", "--model", "fixres_tiny_resnet", "--checkpoint", ckpt,
            "--num-classes", "3",
            *sizes, "--workers", "0", "--quiet"]
    for flag, expect in (([], True), (["--full-decode"], False)):
        out = tmp_path / f"out{int(expect)}"
        code, _, err = cli(capsys, *base, "--out", out, *flag)
        assert code == 0, err
        assert json.loads((out / f"{command}.json").read_text())["reduced_decode"] is expect
    assert seen == [True, False]
