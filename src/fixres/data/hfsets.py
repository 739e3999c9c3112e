"""Hugging Face datasets on disk: a ``save_to_disk`` folder, or a folder of parquet or arrow files.

``--data hf:PATH`` names one. Its splits are the folder layout's (``train``; ``validation``, ``val`` or ``test``
for the evaluation split, in that order); its image column is the one of feature type ``Image`` and its label
column the one of type ``ClassLabel`` (whose names are the classes), unless ``--image-column`` /
``--label-column`` name them. Nothing is downloaded: the ``datasets`` library runs offline
(``HF_DATASETS_OFFLINE=1``). Rows are read as the image's encoded bytes, never decoded by ``datasets``, so a
JPEG row gets the same reduced decode and the same counted skips as a JPEG file (``fixres.data.images``).
Each process opens a dataset once (memory-mapped arrow) and reads rows from it (``read_row``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fixres.errors import UsageError

#: Prefix of ``--data`` (and of a photo's reference) naming a Hugging Face dataset on disk.
HF_PREFIX = "hf:"
#: Split names for the evaluation split, in the order they are looked for.
VAL_SPLITS = ("validation", "val", "test")
#: Files ``datasets`` writes with ``save_to_disk``: a DatasetDict's, then a single Dataset's.
DICT_MARKER, DATASET_MARKER = "dataset_dict.json", "state.json"
#: Data files ``datasets`` loads from a plain folder, by builder.
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
#: Name a single saved Dataset's one split gets (it is read for every split, as a plain folder is).
ONE_SPLIT = "train"

#: (root, split) -> the split opened for reading rows, once per process.
_OPEN: dict[tuple[str, str], object] = {}


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise UsageError("--data hf:PATH needs the datasets library: pip install 'fixres[hf]'") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def is_hf(data: str | os.PathLike) -> bool:
    return os.fspath(data).startswith(HF_PREFIX)


def hf_root(data: str | os.PathLike) -> str:
    """The folder an ``hf:PATH`` value names (made absolute: loader workers may run elsewhere)."""
    root = os.fspath(data)[len(HF_PREFIX):]
    if not root:
        raise UsageError("--data hf: needs a path: hf:PATH (a save_to_disk folder or a folder of parquet files)")
    return os.path.abspath(root)


def open_splits(root: str) -> dict:
    """{split name: Dataset} of the dataset saved at ``root``; one line naming the problem otherwise."""
    datasets = _datasets()
    folder = Path(root)
    if not folder.is_dir():
        raise UsageError(f"Hugging Face dataset folder not found: {root}")
    try:
        if (folder / DICT_MARKER).is_file() or (folder / DATASET_MARKER).is_file():
            loaded = datasets.load_from_disk(root)
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {ONE_SPLIT: loaded}
        files = sorted(p for p in folder.rglob("*") if p.suffix in FILE_BUILDERS)
        if not files:
            raise UsageError(f"{root} is not a Hugging Face dataset: no {DICT_MARKER} (save_to_disk) and no "
                             "parquet or arrow files")
        return dict(datasets.load_dataset(FILE_BUILDERS[files[0].suffix], data_dir=root))
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a folder it cannot read
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot read the Hugging Face dataset at {root}: {first}") from None


def split_for(splits: dict, split: str, root: str) -> str:
    """The dataset's split that stands for ``split`` ("train" or "val"); a one-split dataset serves both."""
    if len(splits) == 1:
        return next(iter(splits))
    wanted = ("train",) if split == "train" else VAL_SPLITS
    found = next((name for name in wanted if name in splits), None)
    if found is None:
        raise UsageError(f"the Hugging Face dataset at {root} has no {' / '.join(wanted)} split "
                         f"(its splits: {', '.join(sorted(splits))})")
    return found


@dataclass(frozen=True)
class Columns:
    """Which column holds the image and which the label, and the class names the labels index."""

    image: str
    label: str
    classes: list[str] | None  # None: the labels are integers without names, or names to be sorted


def find_columns(ds, *, image: str | None = None, label: str | None = None, where: str = "") -> Columns:
    """The image column (feature type ``Image``) and label column (``ClassLabel``), or the ones named."""
    datasets = _datasets()
    features = ds.features
    for name in (image, label):
        if name is not None and name not in features:
            raise UsageError(f"{where}: no column {name!r} (its columns: {', '.join(features)})")
    image = image or next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    label = label or next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image is None:
        raise UsageError(f"{where}: no column of type Image; name it with --image-column")
    if label is None:
        raise UsageError(f"{where}: no column of type ClassLabel; name the label column with --label-column")
    names = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    return Columns(image, label, list(names) if names else None)


def is_dataset(data) -> bool:
    """True for a ``datasets.Dataset`` or ``DatasetDict`` object (duck-typed: ``datasets`` need not be imported)."""
    return all(hasattr(data, a) for a in ("features", "cast_column", "column_names")) or (
        hasattr(data, "keys") and hasattr(data, "values") and bool(list(data.keys()))
        and all(is_dataset(v) for v in data.values()))


def encoded_rows(data, split: str) -> tuple[list[tuple[bytes, int]], list[str]]:
    """((the image's encoded bytes, class index) per row, class names) of a ``datasets`` object given in Python: a
    Dataset, or a DatasetDict's ``split``; the columns found by feature type, the labels' names from ``ClassLabel``
    (else their numbers, or text labels in sorted order)."""
    datasets = _datasets()
    ds = data[split_for(dict(data), split, "the DatasetDict given")] if not hasattr(data, "features") else data
    columns = find_columns(ds, where="the dataset given")
    if isinstance(ds.features[columns.image], datasets.Image):
        ds = ds.cast_column(columns.image, datasets.Image(decode=False))
    labels = ds[columns.label]
    names = columns.classes or ([str(k) for k in range(max(labels) + 1)] if all(isinstance(v, int) for v in labels)
                                else sorted({str(v) for v in labels}))
    at = {name: i for i, name in enumerate(names)}
    rows = []
    for value, label in zip(ds[columns.image], labels):
        if isinstance(value, dict):
            data_bytes = value.get("bytes")
            if data_bytes is None and value.get("path"):
                with open(value["path"], "rb") as f:
                    data_bytes = f.read()
            value = data_bytes or b""
        rows.append((bytes(value), int(label) if isinstance(label, int) else at[str(label)]))
    return rows, names


def _opened(root: str, split: str):
    ds = _OPEN.get((root, split))
    if ds is None:
        ds = open_splits(root)[split].with_format("arrow")
        _OPEN[(root, split)] = ds
    return ds


def read_row(root: str, split: str, column: str, row: int) -> tuple[bytes | None, str | None]:
    """(encoded bytes, path) of the image in ``column`` of ``row``; a raw binary column gives (bytes, None)."""
    try:
        value = _opened(root, split)[row].column(column)[0].as_py()
    except UsageError as exc:
        raise OSError(str(exc)) from None
    except (IndexError, KeyError) as exc:
        raise OSError(f"no row {row} / column {column} in {root} ({split}): {exc}") from None
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    return (bytes(value), None) if value is not None else (None, None)
