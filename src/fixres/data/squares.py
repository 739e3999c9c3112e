"""Coloured-square ImageFolders: the smallest classes a tiny network can tell apart, for smoke runs of any command.

Class k is a noisy dark picture with a square of colour k in it, at a few small sizes and aspect ratios, saved
as JPEGs. The test suite and the quick benchmarks use the same generator, so a quick run sees the photos the
tests do. For photos where resolution matters, use the embedded data set (``fixres.data.synth``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: Colours that make the classes separable by a tiny network.
CLASS_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (160, 50, 200))
#: (width, height) of the photos, taken in turn.
PHOTO_SIZES = ((48, 40), (40, 48), (56, 56), (64, 36))
#: Background noise stays below this grey level, well under every class colour.
NOISE_CEILING = 80
JPEG_QUALITY = 90


def write_image_folder(root: Path, *, classes: int = 3, per_class: int = 4, seed: int = 0,
                       sizes=PHOTO_SIZES) -> Path:
    """ROOT/class_K/img_NNN.jpg for ``classes`` classes of ``per_class`` photos each (seeded); returns ROOT."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(c + i) % len(sizes)]
            arr = rng.integers(0, NOISE_CEILING, size=(h, w, 3), dtype=np.uint8)
            s = min(w, h) // 2
            x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
            arr[y0:y0 + s, x0:x0 + s] = CLASS_COLOURS[c % len(CLASS_COLOURS)]
            Image.fromarray(arr).save(folder / f"img_{i:03d}.jpg", quality=JPEG_QUALITY)
    return root
