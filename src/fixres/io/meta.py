"""The export metadata: the file names of an export and ``fixres.json``, built, written, read and validated.

An export is ``model.safetensors`` plus ``fixres.json`` beside it (and optionally ``model.onnx``).
``fixres.json`` says everything needed to use the model without flags: the model name, the classes,
the test size it was fixed for, the pre-processing (crop ratio, mean, std, interpolation), the train
size it came from and the accuracy measured; plus timm's pretrained_cfg keys (``input_size``,
``test_input_size``, ``crop_pct``, ``test_crop_pct``) so timm users read it too.

The same JSON is also stored in the safetensors header (key ``fixres``), so the weights file alone is
self-describing and is the one file whose atomic replacement publishes an export: a kill between
writing the weights and ``fixres.json`` leaves no stale pair a loader would trust (the header wins,
and a ``fixres.json`` that disagrees with it is named in a warning).

Every field is checked against one schema (``FIELDS``) with a one-line error naming the field, so a
truncated, hand-edited or hostile file is refused instead of raising KeyError/TypeError later. A document
that passed is read once into ``ExportMeta`` (``parse_export_meta``), which code uses by attribute. This
module imports neither ``fixres.models.loading`` nor ``fixres.models.export``: both import it (no cycle).
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fixres.config import INTERPOLATION_NAMES, MAX_RGB_VALUE, MAX_SIZE, MIN_CROP_RATIO, MIN_STD, DataConfig
from fixres.errors import UsageError
from fixres.io.atomic import plain_json, write_json
from fixres.io.schema import parse, parse_or_none
from fixres.version import __version__

WEIGHTS_NAME = "model.safetensors"
META_NAME = "fixres.json"
ONNX_NAME = "model.onnx"
META_FORMAT = "fixres-export-1"
#: Key of the safetensors header's metadata that holds the same JSON as fixres.json.
HEADER_KEY = "fixres"
#: Bytes of the safetensors length prefix (little-endian u64) and the largest header we read.
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
RGB_CHANNELS = 3


class MetaError(UsageError):
    """A fixres.json (or header) field that breaks the schema; the message names the field (bad input: exit 2)."""


# --------------------------------------------------------------------------- field checks

def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> str | None:
    return None if _whole(value) and value > 0 else "expected a whole number > 0"


def _size(value: Any) -> str | None:
    return None if _whole(value) and 0 < value <= MAX_SIZE else f"expected a whole number of pixels in 1..{MAX_SIZE}"


def _unit_fraction(value: Any) -> str | None:
    # A crop ratio of 1e-9 would resize to 1e9 times the crop (an OverflowError, or a photo larger than memory).
    ok = _number(value) and MIN_CROP_RATIO <= value <= 1
    return None if ok else f"expected a number in [{MIN_CROP_RATIO}, 1]"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "expected a non-empty string"


def _rgb(*, positive: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not (isinstance(value, list) and len(value) == RGB_CHANNELS and all(_number(v) for v in value)):
            return "expected a list of three finite numbers (R, G, B)"
        if not all(abs(v) <= MAX_RGB_VALUE for v in value):
            return f"expected three numbers in [-{MAX_RGB_VALUE:g}, {MAX_RGB_VALUE:g}] ([0, 1] units)"
        if positive and not all(v >= MIN_STD for v in value):
            return f"expected three numbers of at least {MIN_STD:g}"
        return None
    return check


def _interpolation(value: Any) -> str | None:
    return None if value in INTERPOLATION_NAMES else f"expected one of {', '.join(INTERPOLATION_NAMES)}"


def _class_names(value: Any) -> str | None:
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return None
    return "expected a list of strings or null"


def _input_size(value: Any) -> str | None:
    ok = isinstance(value, list) and len(value) == 3 and all(_whole(v) and 0 < v <= MAX_SIZE for v in value)
    return None if ok else f"expected [channels, height, width], whole numbers in 1..{MAX_SIZE}"


def _accuracy(value: Any) -> str | None:
    return None if value is None or _number(value) or isinstance(value, dict) else "expected a number, object or null"


def _format(value: Any) -> str | None:
    return None if isinstance(value, str) and value.startswith("fixres-export-") else f"expected {META_FORMAT!r}"


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda value: None if value is None else check(value)


#: The one schema of fixres.json: field -> (required, check). Unknown keys (e.g. ``adaptation``) are kept.
FIELDS: dict[str, tuple[bool, Callable[[Any], str | None]]] = {
    "format": (False, _format),
    "fixres_version": (False, _optional(_text)),
    "model": (False, _optional(_text)),
    "num_classes": (True, _positive_int),
    "class_names": (False, _class_names),
    "train_size": (True, _size),
    "test_size": (True, _size),
    "crop_ratio": (True, _unit_fraction),
    "mean": (True, _rgb(positive=False)),
    "std": (True, _rgb(positive=True)),
    "interpolation": (True, _interpolation),
    "accuracy": (False, _accuracy),
    "input_size": (False, _input_size),
    "test_input_size": (False, _input_size),
    "crop_pct": (False, _unit_fraction),
    "test_crop_pct": (False, _unit_fraction),
}



@dataclass(frozen=True)
class ExportMeta:
    """``fixres.json`` typed (the ``FIELDS`` schema plus ``model_kwargs``), read from a validated document."""

    num_classes: int
    train_size: int
    test_size: int
    crop_ratio: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    format: str | None = None
    fixres_version: str | None = None
    model: str | None = None
    class_names: tuple[str, ...] | None = None
    accuracy: object = None
    input_size: tuple[int, ...] | None = None
    test_input_size: tuple[int, ...] | None = None
    crop_pct: float | None = None
    test_crop_pct: float | None = None
    #: what ``create_model`` needs to rebuild the model as exported (e.g. the fixed input size it was moved to)
    model_kwargs: dict[str, object] = field(default_factory=dict)


def parse_export_meta(meta: Mapping[str, Any]) -> ExportMeta:
    """A document ``validate_meta`` accepted (``read_export_meta``'s result) as an ``ExportMeta``."""
    return parse(ExportMeta, dict(meta))


@dataclass(frozen=True)
class _SafetensorsHeader:
    """The part of a safetensors header fixres reads: its string metadata (``__metadata__``)."""

    metadata: dict[str, str] = field(default_factory=dict, metadata={"json": "__metadata__"})

def _non_finite_field(obj: Any, where: str = "") -> str | None:
    """Path of the first NaN/inf number inside ``obj`` (JSON cannot hold them), else None."""
    if isinstance(obj, numbers.Real) and not math.isfinite(obj):  # numbers.Real: numpy scalars too
        return where or "(top level)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite_field(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def validate_meta(meta: Any, *, source: str) -> dict:
    """Check ``meta`` against ``FIELDS`` and the cross-field rules; return it or raise a one-line MetaError."""
    if not isinstance(meta, dict):
        raise MetaError(f"{source}: expected a JSON object, got {type(meta).__name__}")
    bad = _non_finite_field(meta)
    if bad:
        raise MetaError(f"{source}: field {bad!r} holds a non-finite number (NaN or infinity)")
    for name, (required, check) in FIELDS.items():
        if name not in meta:
            if required:
                raise MetaError(f"{source}: required field {name!r} is missing")
            continue
        problem = check(meta[name])
        if problem:
            raise MetaError(f"{source}: field {name!r}: {problem}, got {_short(meta[name])}")
    typed = parse_export_meta(meta)  # every field read above is of its type now
    names = typed.class_names
    if names is not None and len(names) != typed.num_classes:
        raise MetaError(f"{source}: field 'class_names' has {len(names)} names but 'num_classes' is "
                        f"{typed.num_classes}")
    for key, shape, size, value in (("input_size", typed.input_size, "train_size", typed.train_size),
                                    ("test_input_size", typed.test_input_size, "test_size", typed.test_size)):
        if shape is not None and shape[-1] != value:
            raise MetaError(f"{source}: field {key!r} {list(shape)} disagrees with {size!r} {value}")
    return meta


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- building and writing

def build_meta(*, model_name: str, cfg: DataConfig, test_size: int, train_size: int, num_classes: int,
               class_names: Sequence[str] | None, accuracy: dict | float | None,
               extra: Mapping[str, Any] | None = None) -> dict:
    """The content of fixres.json (fixres keys + timm pretrained_cfg keys), checked against the schema."""
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f"{len(class_names)} class names for a model with {num_classes} outputs")
    meta = {
        "format": META_FORMAT,
        "fixres_version": __version__,
        "model": model_name,
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names is not None else None,
        "train_size": int(train_size),
        "test_size": int(test_size),
        "crop_ratio": float(cfg.crop_ratio),
        "mean": [float(v) for v in cfg.mean],
        "std": [float(v) for v in cfg.std],
        "interpolation": cfg.interpolation,
        "accuracy": accuracy,
        # timm pretrained_cfg keys
        "input_size": [3, int(train_size), int(train_size)],
        "test_input_size": [3, int(test_size), int(test_size)],
        "crop_pct": float(cfg.crop_ratio),
        "test_crop_pct": float(cfg.crop_ratio),
    }
    if extra:
        meta.update(extra)
    bad = _non_finite_field(meta)
    if bad:
        raise UsageError(f"export metadata: field {bad!r} holds a non-finite number (NaN or infinity)")
    try:  # plain JSON values: the header copy and fixres.json then compare equal after reading back
        return validate_meta(plain_json(meta), source="export metadata")
    except MetaError as exc:
        raise UsageError(str(exc)) from None


def header_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors header metadata of an export: the whole fixres.json under ``HEADER_KEY``."""
    return {"format": "pt", HEADER_KEY: json.dumps(meta, allow_nan=False, sort_keys=True)}


def write_meta(out_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``out_dir/fixres.json`` atomically (never NaN/Infinity: ``write_json`` refuses them)."""
    path = Path(out_dir) / META_NAME
    write_json(path, dict(meta))
    return path


# --------------------------------------------------------------------------- reading

def _parse_json(data: bytes, source: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetaError(f"{source} is not valid UTF-8 (byte {exc.start})") from None

    def refuse_constant(name: str):
        raise MetaError(f"{source}: holds {name}, a non-finite number that JSON does not allow")
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise MetaError(f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise MetaError(f"{source} is not valid JSON (nested too deeply)") from None


def read_meta_file(path: str | Path) -> dict:
    """Read and validate one ``fixres.json``; any defect is a one-line MetaError naming the field."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MetaError(f"cannot read {path}: {exc.strerror or exc}") from None
    return validate_meta(_parse_json(data, str(path)), source=str(path))


def read_header_meta(weights: str | Path) -> dict | None:
    """The fixres JSON stored in a safetensors header (possibly partial, from older exports), or None."""
    try:
        with open(weights, "rb") as f:
            length = int.from_bytes(f.read(HEADER_LENGTH_BYTES), "little")
            first = f.read(1)
            if first != b"{" or not 0 < length <= MAX_HEADER_BYTES:
                return None  # not a safetensors header (e.g. a zip or pickle checkpoint): read nothing more
            header = json.loads((first + f.read(length - 1)).decode("utf-8"))
    except (OSError, ValueError):
        return None  # not a safetensors file: the weights loader says so
    typed = parse_or_none(_SafetensorsHeader, header)
    text = typed.metadata.get(HEADER_KEY) if typed is not None else None
    if text is None:
        return None
    value = _parse_json(text.encode("utf-8"), f"{weights} (header)")
    return value if isinstance(value, dict) else None


def _is_complete(meta: dict) -> bool:
    return all(name in meta for name, (required, _) in FIELDS.items() if required)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], keys) -> list[str]:
    return [k for k in keys if a.get(k) != b.get(k)]


def read_export_meta(checkpoint: str | Path) -> dict | None:
    """The export metadata of ``checkpoint``: the safetensors header's copy when complete, else
    ``fixres.json`` beside it (validated, and checked against the partial header of older exports).

    Returns None for a checkpoint that is not a fixres export.
    """
    weights = Path(checkpoint)
    meta_path = weights.with_name(META_NAME)
    on_disk = read_meta_file(meta_path) if meta_path.is_file() else None
    header = read_header_meta(weights) if weights.is_file() else None
    if header is not None and _is_complete(header):
        header = validate_meta(header, source=f"{weights} (header)")
        stale = _differences(on_disk, header, sorted(set(on_disk) | set(header))) if on_disk else []
        if stale:
            print(f"fixres: warning: {meta_path} disagrees with the metadata inside {weights.name} "
                  f"({', '.join(stale[:5])}): stale or edited; using the model file's own metadata", file=sys.stderr)
        return header
    if on_disk is None:
        return None
    stale = _differences(on_disk, header, [k for k in header if k in FIELDS]) if header else []
    if stale:
        raise MetaError(f"{meta_path} is stale: field {stale[0]!r} is {_short(on_disk.get(stale[0]))} but "
                        f"{weights.name} was written with {_short(header[stale[0]])}; export the model again")
    return on_disk
