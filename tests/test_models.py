"""Models and their data configs (issue 3): EfficientNet-Lite registry weights on timm, name resolution,
ImageNet class order, and pre-processing identical to timm's own."""

from __future__ import annotations

import pytest
import torch

from fixres.config import INCEPTION_MEAN, INCEPTION_STD
from fixres.errors import FixresError, UsageError
from fixres.models import (LITE_WEIGHTS, create_model, is_efficientnet_pytorch_layout, lite_weights_path,
                           load_model, load_weights_strict, map_efficientnet_pytorch_keys, num_outputs)

#: Input sizes at which logits must match the reference: the native one and an odd one (padding differs).
ODD_SIZE = 97
#: Size for lite1/lite2 (the key mapping does not depend on the size; small keeps the test fast).
SMALL_SIZE = 96
FLOAT_ROUNDING = 2.5e-7
LITE_CROP = {"efficientnet-lite0": 0.875, "efficientnet-lite1": 0.882, "efficientnet-lite2": 0.89}




def _lite(short):
    pytest.importorskip(LITE_WEIGHTS[short][0], reason=f"registry weights {short} not installed (fixres[lite])")
    return load_model(weights=short)


@pytest.mark.parametrize("short", list(LITE_WEIGHTS))
def test_lite_weights_give_the_reference_logits(short):
    """Strict load onto timm's tf_efficientnet_lite*, and bit-for-bit the logits of the reference
    implementation (efficientnet-lite-pytorch, built for the same input size: its padding is static)."""
    ref_lib = pytest.importorskip("efficientnet_lite_pytorch", reason="reference package efficientnet-lite-pytorch")
    bundle = _lite(short)
    model = bundle.model.eval()
    sizes = [bundle.data_config.train_size, ODD_SIZE] if short == "efficientnet-lite0" else [SMALL_SIZE]
    for size in sizes:
        ref = ref_lib.EfficientNet.from_pretrained(short, weights_path=str(lite_weights_path(short)),
                                                   image_size=size).eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            want, got = ref(x), model(x)
        assert got.shape == (1, 1000)
        assert torch.equal(got, want), f"{short} at {size}: max diff {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("short", list(LITE_WEIGHTS))
def test_lite_data_config(short):
    bundle = _lite(short)
    cfg = bundle.data_config
    assert bundle.name == LITE_WEIGHTS[short][1] and bundle.source == "registry"
    assert cfg.mean == INCEPTION_MEAN == (0.5, 0.5, 0.5) and cfg.std == INCEPTION_STD == (0.5, 0.5, 0.5)
    assert cfg.interpolation == "bicubic"
    assert cfg.train_size == LITE_WEIGHTS[short][2]
    assert cfg.crop_ratio == pytest.approx(LITE_CROP[short])
    assert num_outputs(bundle.model) == 1000


def test_lite_weights_refuse_the_wrong_architecture():
    pytest.importorskip(LITE_WEIGHTS["efficientnet-lite0"][0])
    sd = torch.load(str(lite_weights_path("efficientnet-lite0")), map_location="cpu", weights_only=True)
    assert is_efficientnet_pytorch_layout(sd)
    net, _ = create_model("tf_efficientnet_lite1")
    with pytest.raises(FixresError):
        load_weights_strict(net, map_efficientnet_pytorch_keys(sd, net), source="lite0")
    with pytest.raises(UsageError, match="tf_efficientnet_lite0"):
        load_model(weights="efficientnet-lite0", model="resnet50")
    with pytest.raises(UsageError, match="efficientnet-lite0"):
        load_model(weights="efficientnet-lite9")


def test_lite_file_as_checkpoint_and_new_head():
    """The registry file also works as --checkpoint with --model; --num-classes replaces only the head."""
    base = _lite("efficientnet-lite0").model.eval()
    via_ckpt = load_model(model="tf_efficientnet_lite0", checkpoint=str(lite_weights_path("efficientnet-lite0")))
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(via_ckpt.model.eval()(x), base(x))
    new = load_model(weights="efficientnet-lite0", num_classes=17).model.eval()
    assert num_outputs(new) == 17
    with torch.no_grad():
        assert torch.equal(new.forward_features(x), base.forward_features(x))


def test_timm_and_torchvision_names_resolve():
    net, source = create_model("resnet18", num_classes=7)
    assert source == "timm" and num_outputs(net) == 7
    net, source = create_model("torchvision:resnet18", num_classes=7)
    assert source == "torchvision" and num_outputs(net) == 7
    with pytest.raises(UsageError, match="did you mean"):
        create_model("resnet5O")


def test_network_stride_comes_from_the_model():
    from fixres.models import load_model, network_stride
    assert network_stride(create_model("resnet18")[0]) == 32
    assert network_stride(create_model("vit_tiny_patch16_224")[0]) == 16  # timm records 16 for patch-16 ViTs
    assert network_stride(create_model("torchvision:resnet18")[0]) == 32  # no feature_info: the CNN default
    assert load_model(model="vit_tiny_patch16_224").data_config.stride == 16


def test_wnid_folders_use_imagenet_indices(tmp_path):
    from fixres.data import scan_folder
    from PIL import Image
    for wnid in ("n01443537", "n15075141"):  # goldfish (1) and toilet tissue (999)
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / wnid / "a.png")
    index = scan_folder(tmp_path, num_classes=1000)
    assert [label for _, label in index.samples] == [1, 999]
    assert index.source == "ImageNet wnid order"
    # a model with another number of outputs: plain sorted folders
    assert [label for _, label in scan_folder(tmp_path, num_classes=2).samples] == [0, 1]


@pytest.mark.parametrize("short", ["efficientnet-lite0", "efficientnet-lite1"])
def test_preprocessing_equals_timms_own(shared_data, short):
    """fixres's test transform at the model's size and crop ratio gives the tensors of timm's
    resolve_data_config + create_transform on real photos: same pixels, up to float rounding of the
    scaling to [0, 1] (x / 255 vs x * (1 / 255): 1 ulp; a one-pixel shift would differ by ~1e-2)."""
    from timm.data import create_transform, resolve_data_config

    from fixres.data import scan_folder
    from fixres.images import load_rgb
    from fixres.transforms import test_transform as center_crop_transform
    bundle = _lite(short)
    cfg = bundle.data_config
    timm_cfg = resolve_data_config({}, model=bundle.model)
    assert timm_cfg["crop_pct"] == pytest.approx(cfg.crop_ratio) and timm_cfg["interpolation"] == cfg.interpolation
    reference = create_transform(**timm_cfg, is_training=False)
    ours = center_crop_transform(test_size=cfg.train_size, crop_ratio=cfg.crop_ratio, cfg=cfg)
    samples = scan_folder(shared_data / "imagenet-sample" / "val").samples
    for path, _ in samples[::250]:
        img = load_rgb(path)
        a, b = ours(img), reference(img)
        assert a.shape == b.shape == (3, cfg.train_size, cfg.train_size)
        assert (a - b).abs().max() <= FLOAT_ROUNDING, path
