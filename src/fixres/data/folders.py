"""Data sets as ImageFolder trees: which photos there are and the class index of each.

The class index must match the checkpoint: sorted folder names by default, a class-map file
otherwise, and ImageNet wnid folders map onto the standard 1000 indices (so a subset of ImageNet
classes still gets the right labels). A validation folder is always mapped onto the training (or
model) classes by name (``index_val_onto``): one rule for every command. Folder links that would
show a photo twice or under two classes (symlink loops, links to the data folder or above it, two class
names for one folder) are skipped and named; a photo reached twice (a file link, a hard link) counts
once, and one photo under two classes is an error naming both.
A class folder whose photos all sit in subfolders is a level too high (a split folder read as a class)
and is refused rather than flattened; a root whose only folders are ``train/``, ``val/``, ``test/`` is
read as splits, ``test/`` standing in for a missing ``val/``. Reading the photos into batches, with
unreadable files skipped and counted, is ``fixres.data.loaders``.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fixres.data.images import image_size, is_image_file
from fixres.errors import UsageError
from fixres.runtime.progress import status

WNID_PATTERN = re.compile(r"^n\d{8}$")
IMAGENET_NUM_CLASSES = 1000


@dataclass
class FolderIndex:
    """An ImageFolder tree: class names in index order and (path, label) samples in sorted order."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    source: str = "sorted folders"
    empty_classes: list[str] = field(default_factory=list)
    #: (path, reason) of folder entries left out: symlink loops, links to the data folder or above it.
    skipped_folders: list[tuple[str, str]] = field(default_factory=list)
    #: Classes (of the training set / model) without a single image here (set by ``index_val_onto``).
    missing_classes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 wnids in standard index order (shipped with timm, no download)."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def read_class_map(path: str | os.PathLike) -> list[str]:
    """A class map: JSON list of folder names (index order), JSON {folder: index}, or one name per line."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"class map not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"class map {p}: cannot read it as UTF-8 text ({type(exc).__name__})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if isinstance(obj, dict):
        inv: dict[int, str] = {}
        for name, idx in obj.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0 or idx in inv:
                raise UsageError(f"class map {p}: index for {name!r} must be a unique non-negative integer")
            inv[idx] = str(name)
        if not inv:
            raise UsageError(f"class map {p} is empty")
        return [inv.get(i, f"<unused {i}>") for i in range(max(inv) + 1)]
    if not isinstance(obj, list):
        raise UsageError(f"class map {p}: expected a JSON list or object, or one name per line")
    names = [str(x) for x in obj]
    if not names:
        raise UsageError(f"class map {p} is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"class map {p}: {', '.join(duplicates[:5])} listed more than once")
    return names


def scan_folder(root: str | os.PathLike, *, class_map: Sequence[str] | None = None,
                num_classes: int | None = None, warn: bool = True) -> FolderIndex:
    """Index an ImageFolder tree and decide each folder's class index.

    ``class_map`` (names in index order) wins; else wnid folders use the ImageNet order when the
    model has 1000 outputs (``num_classes``); else sorted folder names. Folder entries that are
    skipped (loops, links upwards) are named on stderr unless ``warn`` is False.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UsageError(f"data path is not a folder: {root}")
    folders, skipped = _class_folders(root)
    if not folders:
        raise UsageError(f"{root} has no class folders (expected an ImageFolder tree: ROOT/CLASS/IMAGE)")
    classes, source = class_order(folders, class_map=class_map, num_classes=num_classes)
    index = {name: i for i, name in enumerate(classes)}
    walker = _FolderWalker(root, [root / f for f in folders])
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for folder in folders:
        files = sorted(walker.image_files(root / folder))
        if not files:
            empty.append(folder)
        _refuse_nested(root / folder, files)
        samples.extend((f, index[folder]) for f in files)
    skipped += walker.skipped
    _refuse_walk_problems(walker)
    for path, reason in skipped:
        status(f"fixres: warning: skipped {path}: {reason}", enabled=warn)
    if not samples:
        raise UsageError(f"{root} holds no image files ({', '.join(e.lstrip('.') for e in ('.jpg', '.png'))}, ...)")
    if empty and source == "sorted folders" and class_map is None:
        raise UsageError(f"empty class folder(s) in {root}: {', '.join(empty[:5])}; remove them or add images")
    return FolderIndex(root=root, classes=classes, samples=samples, source=source, empty_classes=empty,
                       skipped_folders=skipped)


def class_order(folders: list[str], *, class_map: Sequence[str] | None,
                 num_classes: int | None) -> tuple[list[str], str]:
    """The class names in index order and where the order comes from (``scan_folder``'s rule)."""
    if class_map is not None:
        classes, source = list(class_map), "class map"
        unknown = [f for f in folders if f not in classes]
        if unknown:
            raise UsageError(f"folders not in the class map: {', '.join(unknown[:5])}"
                             + (" ..." if len(unknown) > 5 else ""))
    elif all(WNID_PATTERN.match(f) for f in folders) and num_classes in (None, IMAGENET_NUM_CLASSES):
        classes, source = imagenet_wnids(), "ImageNet wnid order"
        known = set(classes)
        foreign = [f for f in folders if f not in known]
        if foreign:  # wnid-shaped names that are not ImageNet classes: the ImageNet order cannot place them
            raise UsageError(f"folder {foreign[0]!r}{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''} "
                             f"looks like an ImageNet wnid but is not one of the {IMAGENET_NUM_CLASSES} ImageNet "
                             "classes: pass --class-map FILE (folder names in class-index order), or --num-classes "
                             "N for a new head")
    else:
        classes, source = folders, "sorted folders"
    refuse_more_classes(classes, num_classes)
    return classes, source


def refuse_more_classes(classes: Sequence[str], num_classes: int | None) -> None:
    """More classes in the data than the model has outputs: one line saying how to go on."""
    if num_classes is not None and len(classes) > num_classes:
        raise UsageError(f"the data has {len(classes)} classes but the model outputs {num_classes}; "
                         "pass --num-classes to replace the head, or --class-map to map folders")


def _refuse_walk_problems(walker: _FolderWalker) -> None:
    """One photo under two classes, or a folder that cannot be read (its photos would vanish): refused."""
    if walker.two_labels:
        first, second = walker.two_labels[0]
        raise UsageError(f"one photo under two classes: {first} and {second} are the same file; "
                         "remove the link (or copy) from the class it does not belong to")
    if walker.unreadable:
        path, reason = walker.unreadable[0]
        raise UsageError(f"cannot read folder {path} ({reason})"
                         + (f" and {len(walker.unreadable) - 1} more" if len(walker.unreadable) > 1 else ""))


def _refuse_nested(folder: Path, files: Sequence[str]) -> None:
    """A class folder with photos only in its subfolders (``ROOT/train/CLASS/x.jpg`` read with ``train`` as
    a class) would merge several classes into one: refused, naming the folder."""
    if not files or any(os.path.dirname(f) == str(folder) for f in files):
        return
    subs = sorted({os.path.relpath(f, folder).split(os.sep)[0] for f in files})
    shown = ", ".join(subs[:3]) + (" ..." if len(subs) > 3 else "")
    raise UsageError(f"class folder {folder} holds no photos of its own, only subfolders ({shown}): "
                     "point --data at the folder whose subfolders are the classes")


def _is_within(path: str, folder: str) -> bool:
    """True when real path ``path`` is ``folder`` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_folders(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Sorted class folder names under ``root``, and (path, reason) for folder entries left out.

    A class entry that is a symlink loop, or links to ``root`` or a folder above it (``val/c -> ..``),
    or to the same photos as another class (one folder inside the other), would count photos twice
    or under two classes; it is left out and named instead.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise UsageError(f"cannot read data folder {root} ({exc.strerror or type(exc).__name__})") from None
    root_real = os.path.realpath(root)
    kept: list[tuple[str, str, bool]] = []  # (name, real path, is a symlink)
    skipped: list[tuple[str, str]] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_dir():
                continue
            os.stat(entry.path)  # a symlink loop raises ELOOP here
        except OSError as exc:
            reason = "symlink loop" if exc.errno == errno.ELOOP else f"cannot read ({exc.strerror or exc})"
            skipped.append((entry.path, reason))
            continue
        real = os.path.realpath(entry.path)
        if _is_within(root_real, real):
            skipped.append((entry.path, "links to the data folder or a folder above it"))
            continue
        kept.append((entry.name, real, entry.is_symlink()))
    # Real folders first, then links in name order: a link into another class's photos is what goes.
    names: list[str] = []
    reals: dict[str, str] = {}
    for name, real, link in sorted(kept, key=lambda k: (k[2], k[0])):
        # Two real folders side by side never hold each other's photos: only a link is compared with the others.
        other = None if not link else next((n for n, r in reals.items() if _is_within(real, r) or _is_within(r, real)),
                                           None)
        if other is not None:
            skipped.append((str(root / name), f"holds the same photos as class folder {other!r}"))
            continue
        reals[name] = real
        names.append(name)
    return sorted(names), skipped


class _FolderWalker:
    """Image files below class folders, entering each real directory once across all classes.

    A link inside a class folder back to the class itself (``cls/again -> cls``) would list every
    image dozens of times; one to the data folder, a folder above it, or another class would put
    photos under two classes. Such links are left out and named (``skipped``); folders that cannot
    be read are collected in ``unreadable`` (the caller refuses: their photos would silently vanish).
    Hidden files and folders (``.ipynb_checkpoints``, macOS ``._x.jpg``) are not part of the data set.
    A photo is one file (device, inode): reached again (a file link, a hard link) it counts once, and
    reached from two classes it is collected in ``two_labels`` (the caller refuses).
    """

    def __init__(self, root: Path, class_folders: Sequence[Path]) -> None:
        self.skipped: list[tuple[str, str]] = []
        self.unreadable: list[tuple[str, str]] = []
        self.two_labels: list[tuple[str, str]] = []
        #: (device, inode) of each photo taken -> (its path, its class folder).
        self.photos: dict[tuple[int, int], tuple[str, Path]] = {}
        self.seen: set[tuple[int, int]] = set()
        self.blocked: dict[tuple[int, int], str] = {}
        real = Path(os.path.realpath(root))
        for folder in (real, *real.parents):
            self._block(folder, "links to the data folder or a folder above it")
        for folder in class_folders:
            self._block(folder, f"links to class folder {folder.name!r}")

    def _block(self, folder: Path, reason: str) -> None:
        try:
            st = os.stat(folder)
        except OSError:
            return
        self.blocked.setdefault((st.st_dev, st.st_ino), reason)

    def _on_error(self, exc: OSError) -> None:
        path = getattr(exc, "filename", None) or "?"
        if exc.errno == errno.ELOOP:
            self.skipped.append((str(path), "symlink loop"))
        else:
            self.unreadable.append((str(path), "unreadable: " + (exc.strerror or type(exc).__name__)))

    def image_files(self, folder: Path) -> list[str]:
        files: list[str] = []
        for dirpath, dirnames, names in os.walk(folder, followlinks=True, onerror=self._on_error):
            try:
                st = os.stat(dirpath)
            except OSError as exc:
                self._on_error(exc)
                dirnames[:] = []
                continue
            key = (st.st_dev, st.st_ino)
            top = dirpath == str(folder)
            reason = None if top else self.blocked.get(key) or ("symlink loop (a folder already indexed)"
                                                                if key in self.seen else None)
            if reason is not None or key in self.seen:
                if reason is not None:
                    self.skipped.append((dirpath, reason))
                dirnames[:] = []
                continue
            self.seen.add(key)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(self._photos(dirpath, st.st_dev, folder,
                                      {f for f in names if is_image_file(f) and not f.startswith(".")}))
        return files

    def _photos(self, dirpath: str, dev: int, folder: Path, wanted: set[str]) -> list[str]:
        """The photos ``wanted`` of ``dirpath`` not already taken; plain files first, so a link is what goes.

        The identity of a plain file comes from the directory listing (its inode) at no extra cost; only
        file links are followed with a ``stat``.
        """
        if not wanted:
            return []
        try:
            entries = sorted((e for e in os.scandir(dirpath) if e.name in wanted),
                             key=lambda e: (e.is_symlink(), e.name))
        except OSError as exc:
            self._on_error(exc)
            return []
        kept = []
        for entry in entries:
            try:
                st = os.stat(entry.path) if entry.is_symlink() else None
            except OSError:
                kept.append(entry.path)  # a dangling link: the loader names it as a bad file
                continue
            key = (st.st_dev, st.st_ino) if st is not None else (dev, entry.inode())
            taken = self.photos.get(key)
            if taken is None:
                self.photos[key] = (entry.path, folder)
                kept.append(entry.path)
            elif taken[1] != folder:
                self.two_labels.append((taken[0], entry.path))
            else:
                self.skipped.append((entry.path, f"the same photo as {taken[0]}"))
        return kept


def index_val_onto(val_root: str | os.PathLike, train: FolderIndex | Sequence[str], *,
                   num_classes: int | None = None, warn: bool = True) -> FolderIndex:
    """Index a validation folder onto the training (or model) classes, by folder name.

    One rule for every command: ``val/NAME`` gets the index of class ``NAME`` of ``train`` (a
    training ``FolderIndex`` or class names in index order); a val class that is not among them is
    an error naming it (its photos would be scored against a class the model never learned); a
    training class without val images is allowed and listed in ``missing_classes`` (print
    ``missing_classes_warning``). With a training index, "missing" means classes that have
    training images, so an ImageNet-wnid subset is not reported as missing 990 classes.
    """
    classes = training_classes(train)
    root = Path(val_root)
    if root.is_dir():
        folders, _ = _class_folders(root)
        known = set(classes)
        unknown = [f for f in folders if f not in known]
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise UsageError(f"val class {shown} in {root} is not one of the {len(classes)} training/model "
                             "classes; remove it or fix the class map")
    index = scan_folder(root, class_map=classes, num_classes=num_classes, warn=warn)
    index.missing_classes = classes_without_photos(index, train)
    return index


def training_classes(train: FolderIndex | Sequence[str]) -> list[str]:
    """The class names a validation set is mapped onto: a training index's, or the names given."""
    return list(train.classes) if isinstance(train, FolderIndex) else [str(c) for c in train]


def classes_without_photos(index: FolderIndex, train: FolderIndex | Sequence[str]) -> list[str]:
    """The classes of ``train`` that ``index`` (mapped onto them) has no photo of: with a training index, those that
    have training photos (an ImageNet-wnid subset is not missing 990 classes); else every named class."""
    classes = training_classes(train)
    expected = ([classes[i] for i in sorted({label for _, label in train.samples})] if isinstance(train, FolderIndex)
                else [c for c in classes if not c.startswith("<unused ")])
    present = {classes[label] for _, label in index.samples}
    return [c for c in expected if c not in present]


def missing_classes_warning(index: FolderIndex) -> str | None:
    """One line naming the training classes with no validation images, or None when there are none."""
    missing = index.missing_classes
    if not missing:
        return None
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (f"{len(missing)} training class(es) have no images in {index.root}: {shown} "
            "(accuracy is over the other classes)")


SPLITS = ("train", "val")
#: Folder names that mark a root as a set of splits when they are its only folders.
SPLIT_NAMES = ("train", "val", "test")
#: Roots already told that their test/ folder is the evaluation split (said once per process).
_TEST_AS_VAL_SAID: set[str] = set()


def _only_splits(root: Path) -> bool:
    """True when every (non-hidden) folder of ``root`` is named like a split: ``train/``, ``val/``, ``test/``."""
    try:
        names = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return False
    return bool(names) and names <= set(SPLIT_NAMES)


def resolve_split(root: str | os.PathLike, split: str) -> Path:
    """Folder of ``split`` ("train" or "val") under ``root``.

    A root holding ``train/`` and ``val/`` (as ImageNet and flowers17 are laid out) gives that
    subfolder; a root whose only folders are ``train/`` and ``test/`` gives ``test/`` for "val" (said on
    stderr once); a plain ImageFolder root is used as it is for either split.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}")
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data folder not found: {root}")
    sub = root / split
    if sub.is_dir():
        return sub
    test_split = (root / "test").is_dir() and _only_splits(root)
    if split == "val" and test_split:
        if str(root) not in _TEST_AS_VAL_SAID:
            _TEST_AS_VAL_SAID.add(str(root))
            status(f"fixres: {root} has no val/ folder: its test/ folder is the evaluation split")
        return root / "test"
    if split == "train" and ((root / "val").is_dir() or test_split):
        raise UsageError(f"{root} has {'val' if (root / 'val').is_dir() else 'test'}/ but no train/ folder")
    return root


def count_image_sizes(index: FolderIndex, limit: int | None = None) -> list[tuple[int, int]]:
    """(width, height) of the data set's images from their headers (for ``fixres analyze --data``)."""
    sizes = []
    for path, _ in index.samples[:limit]:
        s = image_size(path)
        if s is not None:
            sizes.append(s)
    return sizes


def shared_photos(samples: Sequence[tuple[str, int]], others: Sequence[tuple[str, int]]) -> list[str]:
    """Paths of ``samples`` that are also among ``others``: the same file, links resolved (a photo that would be
    reported after being fitted or chosen on)."""
    theirs = {os.path.realpath(p) for p, _ in others}
    return [p for p, _ in samples if os.path.realpath(p) in theirs]
