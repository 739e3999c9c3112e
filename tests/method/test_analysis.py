"""Apparent object size analysis: closed form, Monte Carlo, recommendations, `fixres analyze`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fixres.cli.app import main
from fixres.errors import UsageError
from fixres.method import analysis

#: Eq. (5) with PyTorch defaults (scale 0.08-1, train 224, test resize 256): the paper's 0.80.
PYTORCH_DEFAULT_RATIO = 0.8095
#: Monte-Carlo samples in tests: enough for +-0.003 on the mean ratio, fast.
MC_SAMPLES = 40_000


def test_scale_factor_F_closed_form():
    s_lo, s_hi = math.sqrt(0.08), 1.0
    expected = 2 / 3 * (s_hi ** 3 - s_lo ** 3) / (s_hi ** 2 - s_lo ** 2)
    assert analysis.scale_factor_F() == pytest.approx(expected, rel=1e-12)
    assert analysis.scale_factor_F() == pytest.approx(0.70824, abs=1e-5)
    assert analysis.scale_factor_F((0.25, 0.25)) == pytest.approx(0.5)  # degenerate: sigma fixed


def test_closed_form_pytorch_defaults():
    r = analysis.closed_form_ratio(train_size=224)
    assert r == pytest.approx(PYTORCH_DEFAULT_RATIO, abs=2e-4)
    assert r == pytest.approx(analysis.scale_factor_F() * 256 / 224, rel=1e-12)


@pytest.mark.parametrize("train_size,expected", [(224, 288), (128, 160)])
def test_recommended_test_size(train_size, expected):
    rec = analysis.recommend_test_size(train_size=train_size)
    assert rec["test_size"] == expected
    assert rec["test_size"] % 32 == 0
    assert rec["alpha"] == pytest.approx(1 / analysis.closed_form_ratio(train_size=train_size))
    assert rec["test_size_exact"] == pytest.approx(train_size * rec["alpha"])


def test_recommend_train_size_is_the_inverse():
    inv = analysis.recommend_train_size(test_size=224)
    assert inv["train_size_exact"] == pytest.approx(analysis.scale_factor_F() * 256)
    assert inv["train_size"] == 192
    # Training at the exact inverse size makes apparent sizes match at test_size 224.
    f = analysis.scale_factor_F()
    assert f * analysis.resize_for(224, 0.875) / inv["train_size_exact"] == pytest.approx(1.0)


@pytest.mark.parametrize("size,stride,expected", [(276.7, 32, 288), (271.9, 32, 256), (272.0, 32, 288), (5, 32, 32),
                                                  (100, 1, 100), (47, 16, 48)])
def test_round_to_stride(size, stride, expected):
    assert analysis.round_to_stride(size, stride) == expected


def test_round_to_stride_rejects_bad_stride():
    with pytest.raises(UsageError):
        analysis.round_to_stride(100, 0)


def test_monte_carlo_aspect1_matches_closed_form_on_square_images():
    closed = analysis.closed_form_ratio(train_size=224)
    for wh in ((500, 500), (300, 300)):
        mc = analysis.monte_carlo_ratio(train_size=224, image_sizes=[wh], samples=MC_SAMPLES, seed=1,
                                        ratio=(1.0, 1.0))
        assert abs(mc.mean - closed) < 0.01


def test_monte_carlo_with_real_aspect_jitter_is_lower():
    """RandomResizedCrop's aspect jitter rejects more large crops (the fallback rule): objects look ~0.764x."""
    mc = analysis.monte_carlo_ratio(train_size=224, image_sizes=[(500, 500)], samples=MC_SAMPLES, seed=2)
    assert 0.75 < mc.mean < 0.78
    assert analysis.closed_form_ratio(train_size=224) - mc.mean > 0.03
    q = mc.quantiles
    assert q["0.05"] < q["0.25"] < q["0.5"] < q["0.75"] < q["0.95"]


def test_monte_carlo_no_scale_augmentation_is_exact():
    """With the whole image as RoC (scale 1, aspect 1) every sample is resize / train_size."""
    mc = analysis.monte_carlo_ratio(train_size=224, image_sizes=[(400, 400)], samples=1000, scale=(1.0, 1.0),
                                    ratio=(1.0, 1.0))
    assert mc.std == pytest.approx(0.0, abs=1e-12)
    assert mc.mean == pytest.approx(256 / 224)
    assert np.allclose(mc.train_area_fraction, 1.0)
    assert np.allclose(mc.test_area_fraction, (224 / 256) ** 2)


def test_sampler_matches_torchvision_rrc():
    """The vectorised sampler follows torchvision's RandomResizedCrop.get_params (same mean RoC side)."""
    import torch
    from torchvision.transforms import v2

    h_img, w_img = 300, 500
    torch.manual_seed(0)
    img = torch.zeros(3, h_img, w_img)
    tv = np.array([v2.RandomResizedCrop.get_params(img, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])[2:]
                   for _ in range(2000)], dtype=np.float64)
    rng = np.random.default_rng(0)
    n = 20_000
    h, w = analysis.sample_rrc_boxes(np.full(n, h_img), np.full(n, w_img), rng)
    ours = np.sqrt(h * w)
    theirs = np.sqrt(tv[:, 0] * tv[:, 1])
    assert abs(ours.mean() - theirs.mean()) < 0.03 * theirs.mean()
    assert abs(np.mean(w / h) - np.mean(tv[:, 1] / tv[:, 0])) < 0.04


def test_sampler_fallback_on_extreme_aspect():
    """A 1000x10 strip: no random crop fits, the fallback takes the whole height with aspect clamped to 4/3."""
    rng = np.random.default_rng(0)
    h, w = analysis.sample_rrc_boxes(np.array([10.0]), np.array([1000.0]), rng)
    assert h[0] == 10 and w[0] == 13


def test_parse_image_sizes():
    assert analysis.parse_image_sizes("500x375, 375X500") == [(500, 375), (375, 500)]
    for bad in ("500", "0x10", "axb", ""):
        with pytest.raises(UsageError):
            analysis.parse_image_sizes(bad)


def test_analyze_dict():
    res = analysis.analyze(train_size=224, image_sizes=[(500, 500)], samples=5000, target_test_size=320)
    assert res["test_resize"] == 256
    assert res["recommended_test_size"] == 288
    assert res["for_test_size"]["test_size"] == 320
    assert res["for_test_size"]["train_size"] == 256  # F * 366 = 259.2 -> 256
    assert abs(res["monte_carlo"]["mean_aspect1"] - res["ratio_closed_form"]) < 0.015


# --------------------------------------------------------------------------- the command


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_analyze_json_224(capsys):
    code, out, err = run_cli(capsys, "analyze", "--train-size", "224", "--json", "--samples", "20000")
    assert code == 0
    res = json.loads(out)
    assert round(res["ratio"], 2) == 0.81
    assert res["ratio_closed_form"] == pytest.approx(PYTORCH_DEFAULT_RATIO, abs=2e-4)
    assert res["recommended_test_size"] == 288
    assert 0.75 < res["monte_carlo"]["mean"] < 0.78
    assert abs(res["monte_carlo"]["mean_aspect1"] - res["ratio_closed_form"]) < 0.01
    assert "_mc" not in res


def test_cli_analyze_json_128(capsys):
    code, out, _ = run_cli(capsys, "analyze", "--train-size", "128", "--json", "--samples", "5000")
    assert code == 0 and json.loads(out)["recommended_test_size"] == 160


def test_cli_analyze_text_explains_aspect(capsys):
    code, out, _ = run_cli(capsys, "analyze", "--samples", "5000", "--test-size", "320")
    assert code == 0
    assert "0.8094" in out and "288px" in out
    assert "aspect" in out and "Monte Carlo" in out
    assert "train at 256px" in out


def test_cli_analyze_stride_warning(capsys):
    code, out, err = run_cli(capsys, "analyze", "--samples", "2000", "--test-size", "250")
    assert code == 0
    assert "warning" in err and "stride 32" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "analyze", "--samples", "2000", "--test-size", "256")
    assert code == 0 and err == ""


def test_cli_analyze_image_sizes_and_data(capsys, image_folder):
    code, out, _ = run_cli(capsys, "analyze", "--json", "--samples", "5000", "--image-sizes", "500x375,375x500")
    assert code == 0 and json.loads(out)["monte_carlo"]["image_sizes_used"] == 2
    code, out, _ = run_cli(capsys, "analyze", "--json", "--samples", "5000", "--data", str(image_folder))
    res = json.loads(out)
    assert code == 0 and res["n_images"] == 12 and res["skipped"] == []
    assert res["monte_carlo"]["image_sizes_used"] == 12


def test_cli_analyze_plot(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "analyze", "--json", "--samples", "3000", "--plot", "--out", str(tmp_path))
    assert code == 0
    png = json.loads(out)["plot"]
    from PIL import Image
    with Image.open(png) as im:  # a decodable PNG of a real figure, not just the magic bytes
        assert im.format == "PNG" and min(im.size) >= 100
        im.load()


# --------------------------------------------------------------------------- the training augmentation

def test_cli_analyze_control_augmentation_ratio_one_recommends_train_size(capsys):
    """Appendix D's control (resize + fixed-size random crop) keeps objects at their test-time size."""
    code, out, _ = run_cli(capsys, "analyze", "--train-size", "224", "--train-augment", "control", "--json",
                           "--samples", "5000", "--image-sizes", "500x375,375x500")
    assert code == 0
    res = json.loads(out)
    assert res["ratio"] == 1.0 and res["ratio_closed_form"] == 1.0
    assert res["recommended_test_size"] == 224 and res["train_augment"] == "control"
    assert res["monte_carlo"]["mean"] == pytest.approx(1.0) and res["monte_carlo"]["recommended_test_size"] == 224
    code, out, _ = run_cli(capsys, "analyze", "--train-augment", "control", "--samples", "2000", "--test-size", "288")
    assert code == 0 and "1.0000x" in out and "train at 288px" in out


def test_analysis_follows_the_train_scale_range():
    # RandomResizedCrop over the whole photo (scale 1, 1) zooms in as the control does not: F = 1.
    res = analysis.analyze(train_size=224, scale=(1.0, 1.0))
    assert res["F"] == 1.0 and res["ratio"] == pytest.approx(256 / 224)
    narrow = analysis.analyze(train_size=224, scale=(0.25, 1.0))
    assert narrow["ratio"] == pytest.approx(analysis.scale_factor_F((0.25, 1.0)) * 256 / 224)
    assert narrow["recommended_test_size"] < analysis.analyze(train_size=224)["recommended_test_size"]
    with pytest.raises(UsageError, match="training augmentation"):
        analysis.analyze(train_size=224, train_augment="mixup")


def test_cli_analyze_train_scale_flag(capsys):
    code, out, _ = run_cli(capsys, "analyze", "--train-scale", "0.25,1", "--json", "--samples", "2000")
    assert code == 0 and json.loads(out)["train_scale"] == [0.25, 1.0]
    code, _, err = run_cli(capsys, "analyze", "--train-scale", "0,1")
    assert code == 2 and "0 < MIN <= MAX <= 1" in err
    code, _, err = run_cli(capsys, "analyze", "--train-augment", "control", "--train-scale", "0.5,1")
    assert code == 2 and "control" in err and "Traceback" not in err


def test_the_analysis_step_is_keyed_on_the_train_augmentation():
    from types import SimpleNamespace

    from fixres.job import keys
    cfg = SimpleNamespace(train_size=64, stride=32, crop_ratio=0.875)
    x = SimpleNamespace(data_config=cfg, fingerprints={"val_images": "f"},
                        config=SimpleNamespace(seed=0, train_augment="train"))
    before = keys.key_analyze(x)
    x.config.train_augment = "control"
    assert keys.key_analyze(x) != before and keys.key_analyze(x)["train_augment"] == "control"
