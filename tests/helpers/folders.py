"""Folders the tests read: the repository, the optional real photos, and small generated ImageFolder trees."""

from __future__ import annotations

import os
from pathlib import Path

from fixres.data.squares import write_image_folder  # noqa: F401 - the suite's generator

#: The repository root: this file lives in tests/helpers/.
REPO = Path(__file__).resolve().parents[2]
#: Real photos (an ImageFolder split), beside the repository; tests that need them skip without them.
SHARED_DATA = Path(os.environ.get("FIXRES_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_data(root: Path, *, train_per_class: int = 6, val_per_class: int = 3):
    """ROOT/train and ROOT/val written with :func:`write_image_folder`; returns their two scanned indexes."""
    from fixres.data.folders import scan_folder
    write_image_folder(root / "train", per_class=train_per_class, seed=1)
    write_image_folder(root / "val", per_class=val_per_class, seed=2)
    return scan_folder(root / "train"), scan_folder(root / "val")
