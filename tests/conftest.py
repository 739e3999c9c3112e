"""Shared test fixtures: small generated ImageFolder trees, a tiny model, the optional real-photo folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FIXRES_SHARED_DATA", REPO.parent / "shared" / "data"))
VENV_BIN = Path(sys.executable).parent

#: Colours that make generated classes separable by a tiny network.
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (160, 50, 200)]


def write_image_folder(root: Path, *, classes: int = 3, per_class: int = 4, seed: int = 0,
                       sizes=((48, 40), (40, 48), (56, 56), (64, 36))) -> Path:
    """An ImageFolder of small JPEGs: class k is a noisy picture with a square of colour k in it."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(c + i) % len(sizes)]
            arr = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
            s = min(w, h) // 2
            x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
            arr[y0:y0 + s, x0:x0 + s] = CLASS_COLOURS[c % len(CLASS_COLOURS)]
            Image.fromarray(arr).save(folder / f"img_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one intra-op thread: tiny models gain nothing from threads, one thread
    makes CPU kernels reproducible bit for bit, and on a shared 2-core machine spinning OpenMP threads
    cost many times more than they bring. Subprocesses get OMP_NUM_THREADS=1 from their tests."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 4 small JPEGs (12 images)."""
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """ROOT/train (3 x 6) and ROOT/val (3 x 3), as ImageNet and flowers17 are laid out."""
    root = tmp_path / "split"
    write_image_folder(root / "train", per_class=6, seed=1)
    write_image_folder(root / "val", per_class=3, seed=2)
    return root


@pytest.fixture
def tiny_model():
    import torch

    from fixres.models.loading import load_model
    torch.manual_seed(0)
    return load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real photos not available ({SHARED_DATA} is absent)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Tests that use the real photos carry the ``shared_data`` marker, so ``-m "not shared_data"`` runs
    the suite without them (they also skip by themselves when the folder is absent)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)
