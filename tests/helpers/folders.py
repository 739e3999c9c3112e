"""Folders the tests read: the repository, the optional real photos, and small generated ImageFolder trees."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

#: The repository root: this file lives in tests/helpers/.
REPO = Path(__file__).resolve().parents[2]
#: Real photos (an ImageFolder split), beside the repository; tests that need them skip without them.
SHARED_DATA = Path(os.environ.get("FIXRES_SHARED_DATA", REPO.parent / "shared" / "data"))

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


def tiny_data(root: Path, *, train_per_class: int = 6, val_per_class: int = 3):
    """ROOT/train and ROOT/val written with :func:`write_image_folder`; returns their two scanned indexes."""
    from fixres.data.folders import scan_folder
    write_image_folder(root / "train", per_class=train_per_class, seed=1)
    write_image_folder(root / "val", per_class=val_per_class, seed=2)
    return scan_folder(root / "train"), scan_folder(root / "val")
