"""Train/test geometry: sizes, short-side resize, crop placement, determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fixres.config import DataConfig
from fixres.data import transforms as T
from fixres.data.transforms import (
    AUGMENTATIONS,
    TEST2_MAX_SHIFT,
    MultiView,
    ShiftedCenterCrop,
    build_transform,
    control_transform,
    geometry_for,
    resize_for,
    ten_crop_transform,
    train_transform,
)
from fixres.errors import UsageError

# Imported under other names: pytest would collect functions called test_* as tests.
geometry_of = T.resize_center_crop
da_test = T.test_transform
da2_test = T.test2_transform

CFG = DataConfig(train_size=32)



def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def column_index_image(w: int, h: int) -> Image.Image:
    """Red channel = x coordinate (w <= 256), so a crop's left edge can be read off its pixels."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize("test_size,crop_ratio,expected", [
    (224, 0.875, 256), (288, 0.875, 329), (128, 0.875, 146), (224, 1.0, 224), (320, 0.875, 366), (64, 0.5, 128),
    (1, 0.875, 1),
])
def test_resize_for_values(test_size, crop_ratio, expected):
    assert resize_for(test_size, crop_ratio) == expected


@pytest.mark.parametrize("bad", [(0, 0.875), (-32, 0.875), (224, 0.0), (224, 1.01), (224, -0.5)])
def test_resize_for_rejects_bad_values(bad):
    with pytest.raises(UsageError):
        resize_for(*bad)


@pytest.mark.parametrize("w,h", [(100, 50), (50, 100), (64, 64), (300, 37)])
def test_test_resize_sets_the_shorter_side(w, h):
    """Landscape and portrait photos: the SHORTER side becomes round(test_size / crop_ratio), aspect kept."""
    geometry = geometry_of(geometry_for(32, CFG, 0.875))
    resize_step = geometry.transforms[0]
    out = resize_step(noise_image(w, h))
    short = resize_for(32, 0.875)
    assert min(out.size) == short == 37
    long_expected = max(w, h) * short / min(w, h)
    assert abs(max(out.size) - long_expected) <= 1
    assert (out.size[0] >= out.size[1]) == (w >= h)  # orientation kept


@pytest.mark.parametrize("w,h", [(100, 50), (50, 100), (64, 64), (33, 200), (1, 1), (5, 3)])
@pytest.mark.parametrize("test_size", [16, 32, 48])
def test_test_transform_output_size(w, h, test_size):
    x = da_test(geometry_for(test_size, CFG, 0.875), CFG)(noise_image(w, h))
    assert x.shape == (3, test_size, test_size)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_center_crop_is_centred():
    """With crop_ratio 1 on a square, nothing is cut; on a wide image the crop takes the middle columns."""
    img = column_index_image(200, 50)
    out = geometry_of(geometry_for(50, CFG, 1.0))(img)
    arr = np.asarray(out)
    assert out.size == (50, 50)
    assert arr[0, 0, 0] == 75 and arr[0, -1, 0] == 124  # columns 75..124 of 200: the centre
    assert arr[0, 0, 1] == 0 and arr[-1, 0, 1] == 49  # all rows


def test_test_transform_is_deterministic():
    img = noise_image(80, 60, seed=3)
    t = da_test(geometry_for(32, CFG, 0.875), CFG)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(123)
    random.seed(123)
    b = t(img)
    assert torch.equal(a, b)


def test_normalisation_uses_the_data_config():
    """A grey image equal to the config's mean normalises to ~0; mean/std come from the config, not defaults."""
    cfg = DataConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train_size=32)
    img = Image.new("RGB", (40, 40), (128, 128, 128))
    x = da_test(geometry_for(16, cfg, 0.875), cfg)(img)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-5)
    x_default = da_test(geometry_for(16, CFG, 0.875), CFG)(img)
    assert not torch.allclose(x, x_default)


@pytest.mark.parametrize("w,h", [(100, 50), (50, 100), (40, 40), (20, 300)])
def test_train_transform_size_and_randomness(w, h):
    t = train_transform(train_size=24, cfg=CFG)
    img = noise_image(w, h)
    torch.manual_seed(0)
    outs = [t(img) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # random crops differ
    torch.manual_seed(0)
    again = t(img)
    assert torch.equal(again, outs[0])  # same seed, same crop


def test_train_transform_color_jitter_option():
    plain = train_transform(train_size=24, cfg=CFG)
    jitter = train_transform(train_size=24, cfg=CFG, color_jitter=True)
    names = [type(t).__name__ for t in jitter.transforms]
    assert "ColorJitter" in names and "ColorJitter" not in [type(t).__name__ for t in plain.transforms]
    cj = next(t for t in jitter.transforms if type(t).__name__ == "ColorJitter")
    assert cj.brightness == (0.7, 1.3) and cj.contrast == (0.7, 1.3) and cj.saturation == (0.7, 1.3)
    rrc = plain.transforms[0]
    assert tuple(rrc.scale) == (0.08, 1.0)
    assert rrc.ratio == pytest.approx((3 / 4, 4 / 3))


def test_test2_shift_is_bounded():
    """DA2 shifts the crop horizontally by at most TEST2_MAX_SHIFT of the free margin, never vertically."""
    img = column_index_image(200, 50)
    crop = ShiftedCenterCrop(50)
    slack = (200 - 50) / 2
    lefts = set()
    for seed in range(200):
        random.seed(seed)
        arr = np.asarray(crop(img))
        assert arr.shape == (50, 50, 3)
        left = int(arr[0, 0, 0])
        assert arr[0, 0, 1] == 0  # vertical position is the centre (here the full height)
        assert slack * (1 - TEST2_MAX_SHIFT) - 1 <= left <= slack * (1 + TEST2_MAX_SHIFT) + 1
        lefts.add(left)
    assert len(lefts) > 10  # it does shift
    random.seed(0)
    centred = np.asarray(ShiftedCenterCrop(50, max_shift=0.0)(img))
    assert centred[0, 0, 0] == 75


def test_test2_transform_output():
    t = da2_test(geometry_for(32, CFG, 0.875), CFG)
    for img in (noise_image(90, 40), noise_image(40, 90), noise_image(1, 1)):
        assert t(img).shape == (3, 32, 32)
    torch.manual_seed(0)
    random.seed(0)
    draws = [t(noise_image(90, 40)) for _ in range(4)]  # random shift, flip and jitter: not one fixed view
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_control_and_ten_crop_shapes():
    img = noise_image(70, 50)
    assert control_transform(geometry_for(24, CFG, 0.875), CFG)(img).shape == (3, 24, 24)
    ten = ten_crop_transform(geometry_for(24, CFG, 0.875), CFG)(img)
    assert ten.shape == (10, 3, 24, 24)
    centre = da_test(geometry_for(24, CFG, 0.875), CFG)(img)
    assert torch.allclose(ten[4], centre, atol=1e-5)  # TenCrop order: 4 corners, centre, then mirrors
    mirrored = da_test(geometry_for(24, CFG, 0.875), CFG)(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert torch.allclose(ten[9], mirrored, atol=1e-5)  # the centre crop of the mirrored photo


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_build_transform_names(augment):
    """Each name builds its own augmentation (the paper's train DA with jitter), with the same draws."""
    built = build_transform(augment, size=24, cfg=CFG)
    direct = {"train": lambda: train_transform(train_size=24, cfg=CFG, color_jitter=True),
              "test": lambda: da_test(geometry_for(24, CFG, CFG.crop_ratio), CFG),
              "test2": lambda: da2_test(geometry_for(24, CFG, CFG.crop_ratio), CFG),
              "control": lambda: control_transform(geometry_for(24, CFG, CFG.crop_ratio), CFG,
                                                   color_jitter=True)}[augment]()
    assert repr(built) == repr(direct)
    outs = []
    for t in (built, direct):
        torch.manual_seed(5)
        random.seed(5)
        outs.append(t(noise_image(60, 45)))
    assert outs[0].shape == (3, 24, 24) and torch.equal(outs[0], outs[1])


def test_build_transform_unknown_name():
    with pytest.raises(UsageError, match="unknown augmentation"):
        build_transform("testDA", size=24, cfg=CFG)


def test_multiview_one_decode_many_sizes():
    mv = MultiView([da_test(geometry_for(s, CFG, 0.875), CFG) for s in (16, 24, 32)])
    views = mv(noise_image(50, 40))
    assert isinstance(views, tuple) and [v.shape[-1] for v in views] == [16, 24, 32]


def test_one_pixel_image_is_upsampled_to_test_size():
    x = da_test(geometry_for(32, CFG, 0.875), CFG)(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], x[0, 0, 0].expand(32, 32))  # a flat red field


def test_interpolation_names():
    with pytest.raises(UsageError, match="lanczos"):
        DataConfig(interpolation="lanczos")
    for name in ("nearest", "bilinear", "bicubic"):
        cfg = DataConfig(interpolation=name, train_size=32)
        assert da_test(geometry_for(16, cfg, 0.875), cfg)(noise_image(30, 20)).shape == (3, 16, 16)


@pytest.mark.parametrize("name", ["nearest", "bilinear", "bicubic"])
def test_test_geometry_resamples_with_the_configured_interpolation(name):
    """The data config's interpolation reaches the resize: the output equals torchvision's resize with that
    mode (and the three modes give three different images), not a fixed default."""
    img = noise_image(40, 30, seed=3)
    cfg = DataConfig(interpolation=name, train_size=32)
    got = np.asarray(geometry_of(geometry_for(16, cfg, 0.8))(img))
    from torchvision.transforms.v2 import functional as TF
    want = TF.center_crop(TF.resize(img, 20, interpolation=T.INTERPOLATIONS[name], antialias=True), 16)
    assert np.array_equal(got, np.asarray(want))
    others = [np.asarray(geometry_of(geometry_for(16, DataConfig(interpolation=o, train_size=32), 0.8))(img))
              for o in T.INTERPOLATIONS if o != name]
    assert all(not np.array_equal(got, o) for o in others)
    if name == "nearest":  # nearest copies input pixels: every output colour occurs in the photo
        colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
        assert all(tuple(c) in colours for c in got.reshape(-1, 3))


# --------------------------------------------------------------------------- colour jitter


def _op_names(t) -> list[str]:
    return [type(op).__name__ for op in t.transforms]


def _grey_outputs(t, n: int = 6) -> set[float]:
    """Mean value of a flat grey photo after ``t``, over ``n`` draws: one value unless colours change."""
    img = Image.new("RGB", (60, 45), (120, 120, 120))
    torch.manual_seed(0)
    return {round(float(t(img).mean()), 4) for _ in range(n)}


def test_train_da_by_name_has_the_papers_colour_jitter():
    """Fine-tuning builds "train" by name without a jitter flag: that must be the paper's train DA."""
    paper = build_transform("train", size=24, cfg=CFG)
    assert "ColorJitter" in _op_names(paper)
    cj = next(op for op in paper.transforms if type(op).__name__ == "ColorJitter")
    assert cj.brightness == (1 - T.TRAIN_JITTER, 1 + T.TRAIN_JITTER)
    assert len(_grey_outputs(paper)) > 1  # colours really change
    plain = build_transform("train", size=24, cfg=CFG, color_jitter=False)
    assert "ColorJitter" not in _op_names(plain) and len(_grey_outputs(plain)) == 1


@pytest.mark.parametrize("jitter", [True, False])
def test_control_differs_from_train_da_in_the_crop_only(jitter):
    """Appendix D: "with RRC vs control" must change one thing, the crop; the jitter flag reaches both."""
    train = build_transform("train", size=24, cfg=CFG, color_jitter=jitter)
    control = build_transform("control", size=24, cfg=CFG, color_jitter=jitter)
    assert _op_names(train)[0] == "RandomResizedCrop" and _op_names(control)[:2] == ["Resize", "RandomCrop"]
    assert _op_names(train)[1:] == _op_names(control)[2:]
    for a, b in zip(train.transforms[1:], control.transforms[2:]):
        assert vars(a).keys() == vars(b).keys()
        assert all(repr(vars(a)[k]) == repr(vars(b)[k]) for k in vars(a) if not k.startswith("_"))
    assert (len(_grey_outputs(control)) > 1) == jitter


def test_finetune_with_train_da_uses_the_colour_jitter(capsys, tmp_path, monkeypatch, split_folder):
    """The CLI path: ``fixres finetune --augment train`` builds train DA with jitter."""
    from helpers import save_tiny_checkpoint
    from helpers.cli import cli
    seen = []
    real = T.train_transform

    def spy(**kw):
        seen.append(kw.get("color_jitter"))
        return real(**kw)

    monkeypatch.setattr(T, "train_transform", spy)
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors")
    code, out, err = cli(capsys, "finetune", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data",
                         split_folder, "--test-size", "32", "--epochs", "1", "--augment", "train", "--no-export",
                         "--workers", "0", "--batch-size", "6", "--out", tmp_path / "out", "-q")
    assert code == 0, err
    assert seen and all(seen), seen


@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_fused_normalisation_is_bit_identical_to_torchvisions_three_transforms(mean, std):
    """``NormalizedTensor`` replaces ToImage + ToDtype(scale) + Normalize for speed: same bits, any input."""
    from torchvision.transforms import v2
    plain = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    fused = T.NormalizedTensor(mean, std)
    rng = np.random.default_rng(0)
    for w, h in ((1, 1), (37, 23), (128, 128)):
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        a, b = fused(rgb), plain(rgb)
        assert a.shape == (3, h, w) and a.dtype == torch.float32 and torch.equal(a, b)
    grey = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8))  # not RGB: torchvision's own path
    assert grey.mode == "L" and torch.equal(fused(grey), plain(grey))
    tensor = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8)
    assert torch.equal(fused(tensor), plain(tensor))
    # ... and it is what every fixres transform ends with (test DA here, with CFG's mean and std).
    by_hand = v2.Compose([v2.Resize(18, interpolation=T.interpolation_mode(CFG.interpolation), antialias=True),
                          v2.CenterCrop(16), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize(list(CFG.mean), list(CFG.std))])
    assert torch.equal(T.test_transform(T.geometry_for(16, CFG, 0.875), CFG)(rgb), by_hand(rgb))
