"""Reading one photo robustly: decode, orient, convert to RGB, or say why it cannot be used.

Every data path of fixres (eval, sweep, finetune, train, stats, analyze --data) reads images through
``load_rgb``. It converts what can be converted (grayscale, CMYK, palette, RGBA, 16-bit, EXIF
rotation, animated first frame) and raises ``BadImage`` with a short reason for what cannot
(empty, truncated, corrupt, not an image, absurdly large, or a strip over 50:1), so callers count
and name skips instead of crashing.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Callable

from PIL import Image, ImageOps, UnidentifiedImageError

from fixres.data.sources import open_photo

#: Decompression-bomb guard: refuse images above this many pixels (about 16k x 11k).
MAX_IMAGE_PIXELS = 178_956_970
#: Longest side over shortest side above which an image is refused (no photo is a 50:1 strip).
MAX_ASPECT_RATIO = 50
#: Background for images with transparency (white, as photo viewers show them).
ALPHA_BACKGROUND = (255, 255, 255)
#: ``.jfif``/``.jpe`` are JPEG too (browsers save photos as .jfif); PIL reads them by content.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


#: Reductions libjpeg applies while decoding (DCT-domain scaling), largest first.
JPEG_REDUCTIONS = (8, 4, 2)
#: EXIF orientations that swap width and height (the photo is stored turned by 90 degrees).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class BadImage(Exception):
    """The file cannot be used as an image; ``str(exc)`` is a short reason."""


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMG_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer images: scale to 8 bits instead of clipping everything to white.
        import numpy as np
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        import numpy as np
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def jpeg_reduction(short_side: int, needed: int | None) -> int:
    """The largest JPEG decode reduction (8, 4, 2, else 1) that keeps the shorter side >= ``needed``."""
    if not needed or needed <= 0:
        return 1
    return next((k for k in JPEG_REDUCTIONS if short_side // k >= needed), 1)


def decoded_reduction(full: tuple[int, int], decoded: tuple[int, int]) -> float:
    """The reduction ``k`` that turned a ``full``-size JPEG into ``decoded`` (both upright (w, h)).

    libjpeg's scaled decode keeps ceil(w / k) x ceil(h / k) pixels and its pixel i covers the full
    image's pixels [k * i, k * i + k): a position x in the full image is x / k in the decoded one.
    Dividing the sizes instead (w / ceil(w / k)) is off by up to a pixel at the far edge, a drift
    that costs prediction agreement at low test sizes. A size no reduction explains (not a libjpeg
    scaled decode) falls back to the size ratio.
    """
    for k in (1,) + JPEG_REDUCTIONS[::-1]:
        if (-(-full[0] // k), -(-full[1] // k)) == tuple(decoded):
            return float(k)
    return full[0] / decoded[0]


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block only loses the orientation
        return 1


def _draft_for(img: Image.Image, need: Callable[[tuple[int, int]], int | None]) -> None:
    """Ask ``need`` (given the upright header size) for the shorter side to keep; decode a JPEG smaller.

    PIL's ``draft`` makes libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain, so a photo
    that is resized to a small test size anyway costs a fraction of a full decode. No reduction
    applies (and nothing changes) when the shorter side is under twice what is needed.
    """
    if img.format != "JPEG":
        return  # decoded in full; ``need`` is not asked (a plan that was not asked runs the plain path)
    w, h = img.size
    upright = (h, w) if _orientation(img) in SWAPPING_ORIENTATIONS else (w, h)
    k = jpeg_reduction(min(w, h), need(upright))
    if k > 1:
        # Requesting (w // k, h // k) makes PIL pick exactly k: w // (w // k) lies in [k, 2k).
        img.draft(img.mode, (w // k, h // k))


def _opened(path: str | os.PathLike | bytes) -> str | io.BytesIO:
    """The photo ``path`` names (a file, a shard member, a dataset row), or its bytes as read from a stream, ready
    for ``Image.open``, or ``BadImage``."""
    try:
        source = io.BytesIO(path) if isinstance(path, bytes) else open_photo(path)
        empty = os.stat(source).st_size == 0 if isinstance(source, str) else not source.getbuffer().nbytes
    except OSError as exc:
        raise BadImage(f"cannot read: {exc.strerror or exc}") from None
    if empty:
        raise BadImage("empty file")
    return source


def load_rgb(path: str | os.PathLike | bytes, *,
             need: Callable[[tuple[int, int]], int | None] | None = None) -> Image.Image:
    """Decode ``path`` (a photo's reference, or its bytes) into an upright RGB PIL image, or raise ``BadImage(reason)``.

    ``need``, if given, is called for a JPEG with the upright (width, height) from the header and
    returns the shorter side the decoded image must keep (None: full size); the JPEG is then decoded
    at the largest power-of-two reduction that keeps it (``jpeg_reduction``). Other formats are
    decoded in full without asking.
    """
    source = _opened(path)
    try:
        with warnings.catch_warnings():
            # A corrupt EXIF block or TIFF tag only warns; the image either decodes or is skipped, so
            # per-file warnings would just flood the log. The bomb warning becomes an error (a skip).
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if getattr(img, "is_animated", False):
                    img.seek(0)  # animated GIF/WebP: the first frame
                if need is not None:
                    _draft_for(img, need)
                img.load()
                img = ImageOps.exif_transpose(img)
                w, h = img.size
                if w < 1 or h < 1:
                    raise BadImage("image has no pixels")
                if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                    # Resizing the short side of a 1 x 60000 strip to a test size would need gigabytes.
                    raise BadImage(f"extreme aspect ratio {w}x{h} (over {MAX_ASPECT_RATIO}:1)")
                return _to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"too large (over {MAX_IMAGE_PIXELS} pixels, decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except MemoryError:
        raise BadImage("too large to decode (out of memory)") from None
    except Exception as exc:  # noqa: BLE001 - corrupt files raise anything (OSError, IndexError, struct.error...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg.lower():
            raise BadImage("truncated image") from None
        if not isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
            msg = f"{type(exc).__name__}: {msg}"
        raise BadImage(f"cannot decode: {msg}") from None


def probe_size(path: str | os.PathLike) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height) after EXIF orientation, None) from the header alone, or (None, reason).

    Applies the same size guards as ``load_rgb`` (empty, not an image, too large, extreme aspect),
    so ``fixres analyze --data`` never feeds a bomb's claimed size into the statistics.
    """
    try:
        source = _opened(path)
    except BadImage as exc:
        return None, str(exc)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as img:
                w, h = img.size
                try:
                    orientation = img.getexif().get(0x0112, 1)
                except Exception:  # noqa: BLE001 - a corrupt EXIF block only loses the orientation
                    orientation = 1
    except Image.DecompressionBombError:
        return None, f"too large (over {MAX_IMAGE_PIXELS} pixels, decompression-bomb guard)"
    except UnidentifiedImageError:
        return None, "not an image"
    except Exception as exc:  # noqa: BLE001
        return None, f"cannot read header: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if w < 1 or h < 1:
        return None, "image has no pixels"
    if w * h > MAX_IMAGE_PIXELS:
        return None, f"too large (over {MAX_IMAGE_PIXELS} pixels, decompression-bomb guard)"
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return None, f"extreme aspect ratio {w}x{h} (over {MAX_ASPECT_RATIO}:1)"
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return (w, h), None


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) after EXIF orientation, reading only the header; None if unreadable."""
    return probe_size(path)[0]
