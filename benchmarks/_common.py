"""What the benchmark scripts share: where the repository and the real photos are, the small generated data
set and tiny checkpoint their ``--quick`` modes use, and the small helpers every one of them needs (an atomic
JSON write, the size-list argument, the folder index, the default DataLoader workers, the noise statistics).

The benchmarks run against the installed package (``pip install -e .``: nothing puts src/ on the path) and
use its public API (``import fixres``); a benchmark that measures a library internal by design imports that
one module and says why beside the import. They never import the test suite: the generated folders are
written here (the same generator as tests/helpers/folders.py), and the tiny checkpoint is made through the
public API (``fixres.load``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

# Internal on purpose: what a benchmark shares with the product is the product's own code: its noise statistics
# (standard errors, p-values), its loader's worker count, its atomic JSON writer and its size-list parser.
from fixres.choosing.significance import binomial_se, paired_test, sign_p  # noqa: F401
from fixres.cli.args import int_list  # noqa: F401
from fixres.data.loaders import default_workers  # noqa: F401
from fixres.io.atomic import write_json  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
#: Real photos (see its README); FIXRES_SHARED_DATA points elsewhere.
SHARED = Path(os.environ.get("FIXRES_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_folder(name: str) -> Path | None:
    """SHARED/name, or None after saying on stderr that it is absent (the caller then measures nothing)."""
    path = SHARED / name
    if not path.is_dir():
        print(f"{name} not available ({path} is absent): nothing to measure", file=sys.stderr)
        return None
    return path


def photos_and_weights(data: str | os.PathLike, weights: str):
    """(model bundle of the registry ``weights``, ``data`` as a Path) for a benchmark on real photos,
    or None after printing why it measures nothing (the photos are absent, the weights not installed)."""
    data = Path(data)
    if not data.is_dir():
        print(f"skipped: real photos not available ({data} is absent)")
        return None
    import fixres
    try:
        return fixres.load(weights), data
    except Exception as exc:  # noqa: BLE001 - registry weights not installed
        print(f"skipped: {exc}")
        return None


#: Colours that make generated classes separable by a tiny network.
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (160, 50, 200)]


def write_image_folder(root: Path, *, classes: int = 3, per_class: int = 4, seed: int = 0,
                       sizes=((48, 40), (40, 48), (56, 56), (64, 36))) -> Path:
    """An ImageFolder of small JPEGs: class k is a noisy picture with a square of colour k in it (the test
    suite's generator, so a --quick run sees the photos the tests use)."""
    import numpy as np
    from PIL import Image
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


def save_tiny_checkpoint(path: Path, *, num_classes: int = 3, seed: int = 0) -> Path:
    """Random weights of ``fixres_tiny_resnet`` (train size 32, seeded) as a safetensors file, through the
    public API: the checkpoint a --quick run fixes."""
    import torch
    from safetensors.torch import save_file

    import fixres
    torch.manual_seed(seed)
    bundle = fixres.load("fixres_tiny_resnet", num_classes=num_classes, train_size=32, random_init=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in bundle.model.state_dict().items()}, str(path))
    return Path(path)


def small_split(out: Path, *, val_per_class: int, classes: int = 3, train_per_class: int = 16) -> Path:
    """OUT/data/{train,val}: generated ImageFolders (coloured squares, :func:`write_image_folder`), for --quick
    runs."""
    root = out / "data"
    if not root.is_dir():
        write_image_folder(root / "train", classes=classes, per_class=train_per_class, seed=1)
        write_image_folder(root / "val", classes=classes, per_class=val_per_class, seed=2)
    return root


def spread_sample(samples, n: int) -> list:
    """``n`` samples spread evenly over the (class-sorted) list, so every part of the label space is used."""
    if n >= len(samples):
        return list(samples)
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)]


# --------------------------------------------------------------------------- helpers every benchmark shares

def split_index(data: str | os.PathLike, split: str = "val", *, classes: Sequence[str] | None = None):
    """The photos of ``split`` ("train" or "val": the root's train/ or val/ folder, else the root itself) as a
    ``FolderIndex`` (``.samples``: (path, label) pairs; ``.classes``), indexed as every fixres command indexes a
    folder (``fixres.api.as_index``): ImageNet wnid folders in the ImageNet order, other folders sorted, and a
    validation folder mapped onto ``classes`` (the training classes) by name when they are given."""
    from fixres.api import as_index
    return as_index(Path(data), split, classes=list(classes) if classes is not None else None)
