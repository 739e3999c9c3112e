"""What the benchmark scripts share: where the repository and the real photos are, and the small
generated data set their ``--quick`` modes use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
    from fixres.models.loading import load_model
    try:
        return load_model(weights=weights), data
    except Exception as exc:  # noqa: BLE001 - registry weights not installed
        print(f"skipped: {exc}")
        return None


def small_split(out: Path, *, val_per_class: int, classes: int = 3, train_per_class: int = 16) -> Path:
    """OUT/data/{train,val}: the test suite's generated ImageFolder (coloured squares), for --quick runs."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_image_folder
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
