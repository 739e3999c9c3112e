"""A generated corpus of every awkward image file fixres must survive.

``write_corpus(folder)`` writes one small file per kind and returns ``CorpusEntry`` records saying
what loading it must give: either an upright RGB image of a known size (and, where it matters, a
known colour at a known place), or a skip whose reason contains a known phrase. Everything is
generated (no downloads) and tiny, except that some headers *claim* enormous sizes.

Run as a script to write the corpus somewhere for a manual look: ``python tests/helpers/corpus.py DIR``.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, features

#: EXIF tag holding the orientation (1 = upright, 6 = stored rotated; viewers turn it 90 degrees clockwise).
EXIF_ORIENTATION = 0x0112
RED = (230, 20, 20)
BLUE = (20, 20, 230)
WHITE = (255, 255, 255)
#: JPEG is lossy; colour checks on JPEG-derived files allow this much per channel.
JPEG_TOLERANCE = 24


@dataclass
class CorpusEntry:
    """One file of the corpus and what ``fixres.data.images.load_rgb`` must make of it."""

    name: str
    kind: str
    ok: bool
    size: tuple[int, int] | None = None  # (width, height) after orientation, when ok
    reason: str | None = None  # a phrase the skip reason must contain, when not ok
    pixels: dict = field(default_factory=dict)  # {(x, y): (r, g, b)} expected colours, when ok
    tolerance: int = 2

    @property
    def filename(self) -> str:
        return self.name


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny, well-formed-looking PNG whose header claims ``width`` x ``height`` RGB pixels.

    The data is a few bytes: a decoder that trusted the header would allocate width*height*3 bytes.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _left_red_right_blue(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = RED
    arr[:, w // 2:] = BLUE
    return Image.fromarray(arr)


def write_corpus(folder: str | Path, *, include_good: bool = True) -> list[CorpusEntry]:
    """Write every bad-file kind (and, with ``include_good``, awkward but convertible ones) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries: list[CorpusEntry] = []

    def add(entry: CorpusEntry, data: bytes) -> None:
        (folder / entry.name).write_bytes(data)
        entries.append(entry)

    # ---- files that must be skipped, with a reason
    add(CorpusEntry("zero_bytes.jpg", "zero-byte file", ok=False, reason="empty"), b"")
    good_jpeg = _jpeg_bytes(_left_red_right_blue(64, 48))
    add(CorpusEntry("truncated.jpg", "truncated JPEG", ok=False, reason="truncated"),
        good_jpeg[: len(good_jpeg) * 6 // 10])
    add(CorpusEntry("text_not_image.jpg", "non-image with an image extension", ok=False, reason="not an image"),
        b"this is a text file, not a photo\n" * 20)
    add(CorpusEntry("html_not_image.png", "HTML saved under .png", ok=False, reason="not an image"),
        b"<!doctype html><html><body>404 Not Found</body></html>\n")
    add(CorpusEntry("huge_header.png", "PNG header claiming 100000x100000", ok=False, reason="too large"),
        png_claiming_size(100_000, 100_000))
    add(CorpusEntry("bomb_warning.png", "PNG header claiming 15000x15000 (above the limit, below 2x)",
                    ok=False, reason="too large"),
        png_claiming_size(15_000, 15_000))
    add(CorpusEntry("header_only.png", "PNG header of a 100x100 image with no pixel data", ok=False,
                    reason=""), png_claiming_size(100, 100))

    if include_good:
        # ---- awkward files that must be converted to upright RGB
        arr16 = np.zeros((24, 32), dtype=np.uint16)
        arr16[:, 16:] = 65535  # right half white at full 16-bit scale
        arr16[:, :16] = 32896  # left half mid grey (128 * 257)
        buf = io.BytesIO()
        Image.fromarray(arr16).save(buf, format="PNG")
        add(CorpusEntry("gray16.png", "16-bit grayscale PNG", ok=True, size=(32, 24),
                        pixels={(2, 2): (128, 128, 128), (30, 20): WHITE}), buf.getvalue())

        rgb = _left_red_right_blue(40, 30)
        buf = io.BytesIO()
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(buf, format="PNG")
        add(CorpusEntry("palette.png", "palette PNG", ok=True, size=(40, 30),
                        pixels={(2, 2): RED, (38, 28): BLUE}), buf.getvalue())

        pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        transparent_index = pal.getpixel((38, 28))  # the blue half becomes transparent
        buf = io.BytesIO()
        pal.save(buf, format="PNG", transparency=transparent_index)
        add(CorpusEntry("palette_transparent.png", "palette PNG with a transparent colour", ok=True, size=(40, 30),
                        pixels={(2, 2): RED, (38, 28): WHITE}), buf.getvalue())

        rgba = np.zeros((30, 40, 4), dtype=np.uint8)
        rgba[..., :3] = RED
        rgba[..., 3] = 255
        rgba[:, 20:, 3] = 0  # right half fully transparent
        buf = io.BytesIO()
        Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
        add(CorpusEntry("rgba.png", "RGBA PNG with a transparent half", ok=True, size=(40, 30),
                        pixels={(2, 2): RED, (38, 28): WHITE}), buf.getvalue())

        la = np.zeros((30, 40, 2), dtype=np.uint8)
        la[..., 0] = 0
        la[..., 1] = 255
        la[:, 20:, 1] = 0
        buf = io.BytesIO()
        Image.fromarray(la, mode="LA").save(buf, format="PNG")
        add(CorpusEntry("gray_alpha.png", "grayscale + alpha PNG", ok=True, size=(40, 30),
                        pixels={(2, 2): (0, 0, 0), (38, 28): WHITE}), buf.getvalue())

        add(CorpusEntry("cmyk.jpg", "CMYK JPEG", ok=True, size=(40, 30), tolerance=JPEG_TOLERANCE,
                        pixels={(4, 15): RED, (36, 15): BLUE}),
            _jpeg_bytes(rgb.convert("CMYK")))

        gray = Image.new("L", (36, 28), 90)
        add(CorpusEntry("gray.jpg", "grayscale JPEG", ok=True, size=(36, 28), tolerance=JPEG_TOLERANCE,
                        pixels={(18, 14): (90, 90, 90)}), _jpeg_bytes(gray))

        # Stored landscape 60x40, red on the left; orientation 6 means "turn 90 degrees clockwise to view",
        # so the upright photo is portrait 40x60 with red on top.
        stored = _left_red_right_blue(60, 40)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        add(CorpusEntry("exif_rotated.jpg", "EXIF orientation 6 (stored landscape, upright portrait)", ok=True,
                        size=(40, 60), tolerance=JPEG_TOLERANCE,
                        pixels={(20, 5): RED, (20, 55): BLUE}),
            _jpeg_bytes(stored, exif=exif.tobytes()))

        buf = io.BytesIO()
        Image.new("RGB", (1, 1), RED).save(buf, format="PNG")
        add(CorpusEntry("one_pixel.png", "1x1 image", ok=True, size=(1, 1), pixels={(0, 0): RED}), buf.getvalue())

        frames = [Image.new("RGB", (24, 20), RED), Image.new("RGB", (24, 20), BLUE)]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        add(CorpusEntry("animated.gif", "animated GIF (first frame is used)", ok=True, size=(24, 20),
                        tolerance=8, pixels={(12, 10): RED}), buf.getvalue())

        if features.check("webp"):
            buf = io.BytesIO()
            rgb.save(buf, format="WEBP", quality=95)
            add(CorpusEntry("photo.webp", "WebP", ok=True, size=(40, 30), tolerance=JPEG_TOLERANCE,
                            pixels={(4, 15): RED, (36, 15): BLUE}), buf.getvalue())

        bw = Image.new("1", (16, 8), 0)
        bw.paste(1, (8, 0, 16, 8))
        buf = io.BytesIO()
        bw.save(buf, format="PNG")
        add(CorpusEntry("one_bit.png", "1-bit PNG", ok=True, size=(16, 8),
                        pixels={(1, 1): (0, 0, 0), (14, 6): WHITE}), buf.getvalue())

        buf = io.BytesIO()
        Image.fromarray(np.full((10, 12), 0.25, dtype=np.float32), mode="F").save(buf, format="TIFF")
        add(CorpusEntry("float32.tif", "32-bit float TIFF", ok=True, size=(12, 10)), buf.getvalue())
    return entries


@dataclass
class FolderTraps:
    """A data folder whose class tree holds every awkward link, and what indexing must give."""

    root: Path
    #: class name -> sorted file paths relative to ``root`` that must be its samples (each photo once).
    samples: dict[str, list[str]]
    #: paths relative to ``root`` that must be skipped and named, with a phrase of the reason.
    skipped: dict[str, str]


def write_folder_traps(root: str | Path) -> FolderTraps:
    """An ImageFolder with symlink loops and links upwards, at class level and inside classes.

    ``loop -> loop`` (a class entry that is a loop), ``up -> ..`` (a class that is the folder above),
    ``alias_b -> class_b`` (a second name for a class), ``class_a/back -> ..`` (inside a class, up to
    the data folder), ``class_b/self -> .`` (a class inside itself). Only class_a and class_b are
    classes, each photo counted once; class_a also holds a ``.jfif`` photo, which is read.
    """
    import os
    root = Path(root)
    for c, colour in (("class_a", RED), ("class_b", BLUE)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (24, 20), colour).save(root / c / f"img_{i}.jpg", quality=90)
    Image.new("RGB", (24, 20), RED).save(root / "class_a" / "img_2.jfif", format="JPEG", quality=90)
    os.symlink("loop", root / "loop")
    os.symlink("..", root / "up")
    os.symlink("class_b", root / "alias_b")
    os.symlink("..", root / "class_a" / "back")
    os.symlink(".", root / "class_b" / "self")
    samples = {"class_a": ["class_a/img_0.jpg", "class_a/img_1.jpg", "class_a/img_2.jfif"],
               "class_b": ["class_b/img_0.jpg", "class_b/img_1.jpg"]}
    skipped = {"loop": "symlink loop", "up": "folder above", "alias_b": "class_b",
               "class_a/back": "data folder", "class_b/self": "class_b"}
    return FolderTraps(root, samples, skipped)


def bad_entries(entries: list[CorpusEntry]) -> list[CorpusEntry]:
    return [e for e in entries if not e.ok]


def good_entries(entries: list[CorpusEntry]) -> list[CorpusEntry]:
    return [e for e in entries if e.ok]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "badcorpus")
    for e in write_corpus(out):
        print(f"{'convert' if e.ok else 'skip   '}  {e.name:28s} {e.kind}")
