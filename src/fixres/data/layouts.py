"""The three layouts ``--data`` names, one way in: an ImageFolder tree, WebDataset shards, a Hugging Face dataset.

``resolve_split`` finds a split (``train`` or ``val``) in any of them, ``index_location`` indexes it into a
``FolderIndex`` whose samples name each photo by its reference (``fixres.data.sources``), and the one class-set
rule holds for all three: an evaluation split is mapped onto the training (or model) classes by name
(``map_onto``). Everything downstream (loading, decoding, skipping, scoring, sharding over ranks) sees a
``FolderIndex`` and does not know the layout.

A Hugging Face dataset's image and label columns may be named in the ``--data`` value itself,
``hf:PATH?image=COLUMN&label=COLUMN`` (what ``--image-column`` / ``--label-column`` write), so a run's data is
one value wherever it is recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs

from fixres.data.folders import (
    FolderIndex,
    classes_without_photos,
    index_val_onto,
    scan_folder,
    training_classes,
)
from fixres.data.folders import resolve_split as resolve_folder_split
from fixres.data.hfsets import HF_PREFIX, find_columns, hf_root, is_hf, open_splits, split_for
from fixres.data.labels import label_classes
from fixres.data.shards import ShardSplit, index_shards, is_shards, resolve_shards
from fixres.data.sources import row_ref
from fixres.data.streams import is_stream
from fixres.errors import UsageError

#: What a ``--data`` value's query may name, and the column it names.
COLUMN_KEYS = ("image", "label")


@dataclass(frozen=True)
class HfSplit:
    """One split of a Hugging Face dataset on disk and the columns named for it (None: found by type)."""

    spec: str
    root: str
    split: str
    image: str | None = None
    label: str | None = None

    def __str__(self) -> str:
        return self.spec


Location = Path | ShardSplit | HfSplit


def with_columns(data: str, *, image: str | None, label: str | None) -> str:
    """``hf:PATH`` with its columns named (``--image-column`` / ``--label-column``); refused for other layouts."""
    if image is None and label is None:
        return data
    if not is_hf(data):
        raise UsageError("--image-column and --label-column name columns of a Hugging Face dataset (--data hf:PATH)")
    query = "&".join(f"{k}={v}" for k, v in zip(COLUMN_KEYS, (image, label)) if v)
    return f"{data}{'&' if '?' in data else '?'}{query}"


def _hf_split(data: str, split: str) -> HfSplit:
    path, _, query = data.partition("?")
    named = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = sorted(set(named) - set(COLUMN_KEYS))
    if unknown:
        raise UsageError(f"--data {data}: unknown setting {unknown[0]!r} (known: {', '.join(COLUMN_KEYS)})")
    root = hf_root(path)
    return HfSplit(data, root, split_for(open_splits(root), split, root), named.get("image"), named.get("label"))


def resolve_split(data: str | os.PathLike, split: str) -> Location:
    """Where ``split`` ("train" or "val") of ``data`` is, in whichever layout ``data`` has."""
    text = os.fspath(data)
    if is_stream(text):
        raise UsageError(f"{text.split()[0]}...: shards written by a command can only be streamed, which fixres eval, "
                         "sweep, train, finetune, adapt and stats do; fix reads photos by position: copy the shards "
                         "to a disk")
    if is_hf(text):
        return _hf_split(text, split)
    if is_shards(text):
        return resolve_shards(text, split)
    return resolve_folder_split(data, split)


def require(data: str | os.PathLike, what: str = "data folder") -> None:
    """One line when ``data`` names nothing there: a missing folder, a shard, a dataset folder."""
    text = os.fspath(data)
    if is_stream(text):
        resolve_split(text, "val")
    if is_hf(text):
        if not os.path.isdir(hf_root(text.partition("?")[0])):
            raise UsageError(f"Hugging Face dataset folder not found: {text}")
    elif is_shards(text):
        resolve_shards(text, "val")
    elif not os.path.exists(text):
        raise UsageError(f"{what} not found: {text}")


def canonical(data: str | os.PathLike) -> str:
    """``data`` as one absolute value, the same from any working folder (a run's key)."""
    text = os.fspath(data)
    if is_hf(text):
        path, mark, query = text.partition("?")
        return f"{HF_PREFIX}{hf_root(path)}{mark}{query}"
    return str(Path(text).resolve())


def exists(location: Location) -> bool:
    """True when the split is there to be read (a folder split may be a missing val/)."""
    return location.is_dir() if isinstance(location, Path) else True


def _index_hf(location: HfSplit, *, class_map: Sequence[str] | None, num_classes: int | None) -> FolderIndex:
    ds = open_splits(location.root)[location.split]
    columns = find_columns(ds, image=location.image, label=location.label, where=location.spec)
    values = list(ds[columns.label])
    if any(v is None for v in values):
        raise UsageError(f"{location.spec}: {sum(v is None for v in values)} rows have no label")
    classes, labels, source = label_classes(values, names=columns.classes, class_map=class_map,
                                            num_classes=num_classes, where=location.spec)
    samples = [(row_ref(location.root, location.split, columns.image, row), y) for row, y in enumerate(labels)]
    return FolderIndex(root=Path(location.spec), classes=classes, samples=samples, source=f"{source} (Hugging Face)")


def map_onto(index: FolderIndex, train: FolderIndex | Sequence[str]) -> FolderIndex:
    """``index`` relabelled onto ``train``'s classes by name (``index_val_onto``'s rule, for any layout)."""
    classes = training_classes(train)
    at = {name: i for i, name in enumerate(classes)}
    used = {index.classes[y] for _, y in index.samples}
    unknown = [c for c in index.classes if c in used and c not in at]
    if unknown:
        raise UsageError(f"val class {unknown[0]!r} in {index.root} is not one of the {len(classes)} training/model "
                         "classes; remove it or fix the class map")
    mapped = FolderIndex(root=index.root, classes=classes, samples=[(ref, at[index.classes[y]]) for ref, y in
                                                                    index.samples],
                         source=index.source, skipped_folders=index.skipped_folders)
    mapped.missing_classes = classes_without_photos(mapped, train)
    return mapped


def index_location(location: Location, *, classes: FolderIndex | Sequence[str] | None = None,
                   class_map: Sequence[str] | None = None, num_classes: int | None = None,
                   warn: bool = True) -> FolderIndex:
    """The photos of one split: mapped onto ``classes`` by name when they are known, else in ``class_map`` order,
    else the layout's own order (sorted folders, class numbers, the dataset's label names)."""
    if not isinstance(location, (ShardSplit, HfSplit)):  # a path: a folder, or shards and datasets named as paths
        text = os.fspath(location)
        location = resolve_split(text, "val") if is_hf(text) or is_shards(text) else Path(text)
    if isinstance(location, Path):
        if classes is not None:
            return index_val_onto(location, classes, num_classes=num_classes, warn=warn)
        return scan_folder(location, class_map=class_map, num_classes=num_classes, warn=warn)
    if isinstance(location, ShardSplit):
        own = index_shards(location, class_map=class_map, num_classes=num_classes, warn=warn)
    else:
        own = _index_hf(location, class_map=class_map, num_classes=num_classes)
    return map_onto(own, classes) if classes is not None else own
