"""Photos handed over as images, not files: a map-style dataset or any iterable of (PIL image, class index).

Every fixres path reads photos from files (one decode per photo and JPEG reduction, unreadable files counted
and skipped, the same photos named in every result). Images given in memory are therefore written once to a
temporary ImageFolder as PNG, which is lossless: each photo is read back with exactly the pixels it was given,
and from then on it is a folder like any other. JPEG's reduced decoding cannot apply to them (no JPEG file is
known), so their numbers are those of a full decode. Images given as their encoded bytes (a Hugging Face dataset's
rows) are written as they are, so a JPEG stays a JPEG, decoded as its file would be. The folder is removed when
the process ends.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from fixres.data.folders import FolderIndex
from fixres.errors import UsageError

#: How the photos are stored: lossless, so the pixels read back are the ones given.
PHOTO_SUFFIX = ".png"
#: PIL modes PNG cannot hold, and the mode they are stored in (the RGB the loader reads them as).
CONVERTED_MODES = {"CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "F": "RGB", "I;16": "I"}
FOLDER_PREFIX = "fixres-photos-"
#: PIL format names whose usual file suffix is not the name itself.
ENCODED_SUFFIXES = {"JPEG": ".jpg", "TIFF": ".tif", "PPM": ".ppm"}


def is_image(value: Any) -> bool:
    return isinstance(value, Image.Image)


def _suffix_of(data: bytes) -> str:
    """The file suffix of encoded image bytes (its format as PIL reads it); ``.jpg`` for what PIL cannot name."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return ENCODED_SUFFIXES.get(img.format or "", f".{(img.format or 'jpg').lower()}")
    except Exception:  # noqa: BLE001 - not an image: kept, and counted as a skip when it is read
        return ".jpg"


def write_given(items: Iterable[tuple[Any, Any]], *, classes: Sequence[str] | None = None,
                folder: Path | None = None) -> FolderIndex:
    """The (PIL image or its encoded bytes, class index) pairs of ``items`` as a ``FolderIndex`` over files in
    ``folder`` (default: a temporary folder removed at exit; PNGs for images, the bytes as they are), in the order
    given; ``classes`` names the class indices (default: their numbers)."""
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        atexit.register(shutil.rmtree, folder, True)
    samples: list[tuple[str, int]] = []
    for i, item in enumerate(items):
        try:
            image, label = item
            label = int(label)
        except (TypeError, ValueError):
            raise UsageError(f"item {i}: expected (PIL image, class index), got {type(item).__name__}") from None
        if isinstance(image, (bytes, bytearray)):
            path = folder / f"{label:05d}" / f"{i:08d}{_suffix_of(image)}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image)  # an unreadable one is a counted skip when it is read, as a file's
            samples.append((str(path), label))
            continue
        if not is_image(image):
            raise UsageError(f"item {i}: expected a PIL image, got {type(image).__name__} (give the dataset without "
                             "its transform: fixres applies the model's own pre-processing)")
        if label < 0:
            raise UsageError(f"item {i}: class index {label} is negative")
        path = folder / f"{label:05d}" / f"{i:08d}{PHOTO_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = CONVERTED_MODES.get(image.mode)
        (image.convert(mode) if mode else image).save(path)
        samples.append((str(path), label))
    if not samples:
        raise UsageError("no images given")
    top = max(y for _, y in samples)
    names = list(classes) if classes is not None else [str(k) for k in range(top + 1)]
    if len(names) <= top:
        raise UsageError(f"class index {top} given, but only {len(names)} class names")
    return FolderIndex(root=folder, classes=names, samples=samples, source="given images")
