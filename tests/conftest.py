"""The pytest fixtures and hooks every test folder shares; the factories they use live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED_DATA, tiny_resnet, write_image_folder


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
    """``fixres_tiny_resnet`` with 3 classes, train size 32, seed 0."""
    return tiny_resnet()


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
