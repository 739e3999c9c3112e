"""Models and their data configs: EfficientNet-Lite registry weights on timm, name resolution,
ImageNet class order, and pre-processing identical to timm's own."""

from __future__ import annotations

import json

import pytest
import torch

from fixres.config import INCEPTION_MEAN, INCEPTION_STD
from fixres.data.transforms import geometry_for
from fixres.errors import FixresError, UsageError
from fixres.models.loading import LITE_WEIGHTS, create_model, lite_weights_path, load_model, num_outputs
from fixres.models.statedict import is_efficientnet_pytorch_layout, load_weights_strict, map_efficientnet_pytorch_keys

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
    from fixres.models.loading import load_model, network_stride
    assert network_stride(create_model("resnet18")[0]) == 32
    assert network_stride(create_model("vit_tiny_patch16_224")[0]) == 16  # timm records 16 for patch-16 ViTs
    assert network_stride(create_model("torchvision:resnet18")[0]) == 32  # no feature_info: the CNN default
    assert load_model(model="vit_tiny_patch16_224").data_config.stride == 16


def test_wnid_folders_use_imagenet_indices(tmp_path):
    from PIL import Image

    from fixres.data.folders import scan_folder
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

    from fixres.data.folders import scan_folder
    from fixres.data.images import load_rgb
    from fixres.data.transforms import test_transform as center_crop_transform
    bundle = _lite(short)
    cfg = bundle.data_config
    timm_cfg = resolve_data_config({}, model=bundle.model)
    assert timm_cfg["crop_pct"] == pytest.approx(cfg.crop_ratio) and timm_cfg["interpolation"] == cfg.interpolation
    reference = create_transform(**timm_cfg, is_training=False)
    ours = center_crop_transform(geometry_for(cfg.train_size, cfg, cfg.crop_ratio), cfg)
    samples = scan_folder(shared_data / "imagenet-sample" / "val").samples
    for path, _ in samples[::250]:
        img = load_rgb(path)
        a, b = ours(img), reference(img)
        assert a.shape == b.shape == (3, cfg.train_size, cfg.train_size)
        assert (a - b).abs().max() <= FLOAT_ROUNDING, path


# --------------------------------------------------------------------------- No silent random weights

#: Commands that measure or adapt a given model: a bare --model must be refused.
_WEIGHTS_COMMANDS = {
    "eval": ["--test-size", "32"],
    "sweep": ["--test-sizes", "32"],
    "finetune": ["--test-size", "32", "--epochs", "1", "--no-export"],
    "adapt": ["--method", "bn-recalibrate", "--test-size", "32", "--no-eval"],
    "stats": ["--sizes", "32"],
}


def _main(capsys, *argv):
    from fixres.cli.app import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", list(_WEIGHTS_COMMANDS))
def test_bare_model_name_is_refused_without_random_init(capsys, tmp_path, image_folder, command):
    code, _, err = _main(capsys, command, "--model", "fixres_tiny_resnet", "--num-classes", "3", "--data",
                         image_folder, "--workers", "0", "--out", tmp_path / "o", "-q", *_WEIGHTS_COMMANDS[command])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "no weights" in lines[0] and "--random-init" in lines[0] and "--pretrained" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing measured, nothing written


def test_random_init_is_explicit_and_exclusive(capsys, tmp_path, image_folder):
    argv = ["eval", "--model", "fixres_tiny_resnet", "--num-classes", "3", "--data", image_folder, "--workers", "0",
            "--test-size", "32", "--out", tmp_path / "o", "--json", "-q"]
    code, out, err = _main(capsys, *argv, "--random-init")
    assert code == 0, err
    import json
    assert json.loads(out)["n_images"] == 12
    code, _, err = _main(capsys, *argv, "--random-init", "--pretrained")
    assert code == 2 and "--random-init" in err


def test_train_and_fix_still_build_random_weights():
    """train and fix train from scratch: no --random-init flag to ask for, and the spec allows it."""
    from fixres.cli.app import build_parser
    from fixres.cli.args import model_spec
    parser = build_parser()
    for command in ("train", "fix"):
        args = parser.parse_args([command, "--model", "fixres_tiny_resnet", "--data", "x", "--train-size", "32"])
        assert not hasattr(args, "random_init") and model_spec(args).random_init is True
    args = parser.parse_args(["eval", "--model", "fixres_tiny_resnet", "--data", "x"])
    assert model_spec(args).random_init is False
    with pytest.raises(UsageError, match="--random-init"):
        model_spec(args).load()


def _offline(monkeypatch, tmp_path):
    """An offline machine with empty caches (nothing here may touch the network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _download_line(capsys, tmp_path, command: str, data) -> str:
    """``fixres COMMAND --model resnet18 --pretrained`` offline with empty caches: its one error line."""
    code, _, err = _main(capsys, command, "--model", "resnet18", "--pretrained", "--data", data,
                         "--out", tmp_path / command, "-q")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, err
    return lines[0]


def test_pretrained_offline_and_not_cached_says_what_to_download(capsys, monkeypatch, tmp_path, image_folder):
    _offline(monkeypatch, tmp_path)
    line = _download_line(capsys, tmp_path, "eval", image_folder)
    assert "huggingface-cli download timm/resnet18.a1_in1k" in line and str(tmp_path / "hf" / "hub") in line
    with pytest.raises(FixresError) as info:
        load_model(model="torchvision:resnet18", pretrained=True)
    msg = str(info.value)
    assert "download.pytorch.org/models/resnet18-" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg


def _fake_torchvision_cache(name: str, tmp_path) -> dict:
    """Write random weights where torch.hub caches torchvision's DEFAULT weights of ``name``; return them."""
    import os

    import torchvision
    weights = torchvision.models.get_model_weights(name).DEFAULT
    torch.manual_seed(3)
    sd = torchvision.models.get_model(name, num_classes=len(weights.meta["categories"])).state_dict()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / os.path.basename(weights.url))
    return sd


def test_pretrained_torchvision_weights_come_from_the_cache_with_their_recipe(monkeypatch, tmp_path, split_folder):
    """RegNetY-400MF IMAGENET1K_V2 (torchvision's new recipe): resize 232, crop 224, bilinear,
    trained at 176 -- the train size fed to the analysis is 176, not the ImageNet default 224."""
    _offline(monkeypatch, tmp_path)
    sd = _fake_torchvision_cache("regnet_y_400mf", tmp_path)
    bundle = load_model(model="torchvision:regnet_y_400mf", pretrained=True)
    got = bundle.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    cfg = bundle.data_config
    assert (cfg.train_size, cfg.interpolation) == (176, "bilinear")
    assert cfg.crop_ratio == pytest.approx(224 / 232) and bundle.meta["test_size"] == 224
    from fixres.method.analysis import recommend_test_size
    from fixres.method.inputs import load_for_adaptation
    from fixres.models.loading import ModelSpec
    inputs = load_for_adaptation(ModelSpec(model="torchvision:regnet_y_400mf", pretrained=True, num_classes=3),
                                 split_folder)
    assert inputs.cfg.train_size == 176 and num_outputs(inputs.bundle.model) == 3
    assert inputs.test_size == recommend_test_size(train_size=176, crop_ratio=224 / 232, stride=32)["test_size"]


def test_torchvision_recipe_of_resnet50_v2_without_download():
    from torchvision.models import ResNet50_Weights

    from fixres.models.loading import torchvision_recipe
    fields, test_size, note = torchvision_recipe(ResNet50_Weights.IMAGENET1K_V2)
    assert (fields["train_size"], test_size, fields["interpolation"]) == (176, 224, "bilinear")
    assert fields["crop_ratio"] == pytest.approx(224 / 232) and "176" in note
    fields, test_size, _ = torchvision_recipe(ResNet50_Weights.IMAGENET1K_V1)  # the classic recipe: 224, 256
    assert (fields["train_size"], test_size) == (224, 224) and fields["crop_ratio"] == pytest.approx(0.875)


def test_pretrained_cache_is_never_unpickled(monkeypatch, tmp_path):
    """A cached torchvision file holding a pickled object (code) is refused, not executed."""
    import os

    import torchvision
    _offline(monkeypatch, tmp_path)
    weights = torchvision.models.get_model_weights("regnet_y_400mf").DEFAULT
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"payload": _Unpicklable(str(tmp_path / "pwned"))}, folder / os.path.basename(weights.url))
    with pytest.raises(FixresError, match="regnet_y_400mf"):
        load_model(model="torchvision:regnet_y_400mf", pretrained=True)
    assert not (tmp_path / "pwned").exists()


class _Unpicklable:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os_touch, (self.path,))


def os_touch(path):  # pragma: no cover - must never run
    open(path, "w").close()


# --------------------------------------------------------------------------- Build once, copy cheaply

def _count_builds(monkeypatch) -> list:
    from timm.models.resnet import ResNet
    calls = []
    original = ResNet.__init__

    def counting(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ResNet, "__init__", counting)
    return calls


def test_checkpoint_load_builds_the_model_once(monkeypatch, tmp_path):
    from fixres.io.checkpoint import save_safetensors
    from fixres.models.export import export_model
    torch.manual_seed(0)
    bundle = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32)
    save_safetensors(bundle.model.state_dict(), tmp_path / "plain.safetensors")
    export = export_model(bundle.model, tmp_path / "exp", model_name="fixres_tiny_resnet", cfg=bundle.data_config,
                          test_size=48, train_size=32, class_names=["a", "b", "c"], accuracy=None)
    calls = _count_builds(monkeypatch)
    back = load_model(model="fixres_tiny_resnet", checkpoint=str(tmp_path / "plain.safetensors"))
    assert len(calls) == 1 and num_outputs(back.model) == 3  # classes read from the checkpoint, one build
    calls.clear()
    again = load_model(checkpoint=str(export))
    assert len(calls) == 1 and again.meta["export"]["test_size"] == 48
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), bundle.model.eval()(x))


def test_bundle_copy_is_independent_and_costs_no_build(monkeypatch, tiny_model):
    calls = _count_builds(monkeypatch)
    twin = tiny_model.copy()
    assert calls == [] and twin.data_config == tiny_model.data_config and twin.model is not tiny_model.model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin.model.eval()(x), tiny_model.model.eval()(x))
        twin.model.fc.weight.add_(1.0)
        assert not torch.equal(twin.model(x), tiny_model.model.eval()(x))
    snapshot = tiny_model.state_snapshot()
    with torch.no_grad():
        tiny_model.model.fc.bias.add_(1.0)
    tiny_model.restore(snapshot)
    assert torch.equal(tiny_model.model.fc.bias, snapshot["fc.bias"])


# --------------------------------------------------------------------------- Model-creation failures

@pytest.mark.parametrize("name,phrase", [("resnet5O", "did you mean"), ("keras:resnet50", "unknown model library"),
                                         ("no_such_arch_at_all", "unknown model")])
def test_unknown_model_names_are_usage_errors(name, phrase):
    with pytest.raises(UsageError, match=phrase):
        load_model(model=name, random_init=True)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="num_classes"):
        create_model("resnet18", num_classes=bad)
    with pytest.raises(UsageError, match="num_classes"):
        load_model(model="fixres_tiny_resnet", num_classes=bad)


def test_builtin_has_no_pretrained_weights():
    with pytest.raises(UsageError, match="no pretrained weights"):
        load_model(model="fixres_tiny_resnet", pretrained=True)


def test_one_source_of_weights(tmp_path):
    with pytest.raises(UsageError, match="one source of weights"):
        load_model(model="resnet18", checkpoint=str(tmp_path / "x.safetensors"), pretrained=True)


def test_eval_of_torchvision_weights_defaults_to_their_own_test_size(capsys, monkeypatch, tmp_path, image_folder):
    """RegNetY-400MF V2 was trained at 176 and is tested at 224 (its transforms()): fixres eval's default."""
    import json
    _offline(monkeypatch, tmp_path)
    _fake_torchvision_cache("regnet_y_400mf", tmp_path)
    code, out, err = _main(capsys, "eval", "--model", "torchvision:regnet_y_400mf", "--pretrained", "--num-classes",
                           "3", "--data", image_folder, "--workers", "0", "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert [r["test_size"] for r in res["rows"]] == [224] and res["train_size"] == 176
    assert res["data_config"]["crop_ratio"] == pytest.approx(224 / 232)


def test_fix_pretrained_offline_and_not_cached_says_what_to_download(capsys, monkeypatch, tmp_path, split_folder):
    _offline(monkeypatch, tmp_path)
    line = _download_line(capsys, tmp_path, "fix", split_folder)
    assert "huggingface-cli download timm/resnet18.a1_in1k" in line and str(tmp_path / "hf" / "hub") in line


def test_fix_pretrained_torchvision_weights_use_their_own_recipe(capsys, monkeypatch, tmp_path, split_folder):
    """`fix --pretrained` on torchvision weights: their recipe (trained at 176, bilinear) is the run's T."""
    _offline(monkeypatch, tmp_path)
    _fake_torchvision_cache("regnet_y_400mf", tmp_path)
    code, _, err = _main(capsys, "fix", "--model", "torchvision:regnet_y_400mf", "--pretrained", "--data",
                         split_folder, "--test-size", "192", "--test-sizes", "176,192", "--train-epochs", "1",
                         "--epochs", "1", "--batch-size", "8", "--train-batch-size", "8", "--workers", "0",
                         "--out", tmp_path / "run", "-q")
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_size"] == 176 and run["config"]["pretrained"] is True
    assert json.loads((tmp_path / "run" / "export" / "fixres.json").read_text())["interpolation"] == "bilinear"
