"""Argument helpers shared by subcommands: typed parsers that turn bad values into usage errors."""

from __future__ import annotations

import argparse
import math
import sys

from fixres.config import (
    DEFAULT_CLASSES,
    DEFAULT_TRAIN_PER_CLASS,
    DEFAULT_VAL_PER_CLASS,
    INTERPOLATION_NAMES,
    MAX_RGB_VALUE,
    MAX_SIZE,
    MIN_CROP_RATIO,
    MIN_STD,
    SEED_LIMIT,
    validate_crop_ratio,
)
from fixres.errors import UsageError

#: Largest image size a size flag or list may hold (``config.MAX_SIZE``): past this a batch no longer fits in
#: memory, and no network in the paper is evaluated there (the largest test size in its tables is 800).
MAX_IMAGE_SIZE = MAX_SIZE
#: Most sizes one list may hold (a sweep of 128:384:8 is 33 sizes); more is a typo, not a protocol.
MAX_SIZES = 64


def _finite(v: float, text: str) -> float:
    """``inf`` and ``nan`` parse as floats but are never a valid setting (a NaN model, Infinity in JSON)."""
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _number(text: str, cast, *, positive: bool):
    """Parse ``text`` with ``cast`` (int or float) and check its sign; nan and inf are refused."""
    try:
        v = cast(text)
    except ValueError:
        kind = "a whole number" if cast is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    _finite(v, text)
    if positive and not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    if not positive and not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, positive=True)


def nonneg_int(text: str) -> int:
    return _number(text, int, positive=False)


def positive_float(text: str) -> float:
    return _number(text, float, positive=True)


def nonneg_float(text: str) -> float:
    return _number(text, float, positive=False)


def image_size(text: str) -> int:
    """A train or test size in pixels: a whole number in 1..MAX_IMAGE_SIZE."""
    v = positive_int(text)
    if v > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"size {v} is over the largest supported size {MAX_IMAGE_SIZE}")
    return v


def seed(text: str) -> int:
    """A random seed, the one rule of every command: a whole number in 0..2**32-1 (what numpy takes too)."""
    v = _number(text, int, positive=False)
    if v >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be below 2**32 ({SEED_LIMIT}), got {v}")
    return v


def bounded_int(limit: int, what: str):
    """A positive whole number at most ``limit`` (``what`` names the limit in the message)."""
    def parse(text: str) -> int:
        v = positive_int(text)
        if v > limit:
            raise argparse.ArgumentTypeError(f"{v} is over the largest {what}, {limit}")
        return v
    parse.__name__ = f"at most {limit}"
    return parse


def crop_ratio(text: str) -> float:
    try:
        v = float(text)
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number in (0, 1], got {text!r}")
        validate_crop_ratio(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if v < MIN_CROP_RATIO:
        raise argparse.ArgumentTypeError(f"crop ratio {text} is below {MIN_CROP_RATIO} (the resize would be "
                                         f"over {round(1 / MIN_CROP_RATIO)}x the crop); typical: 0.875 or 1.0")
    return v


def _size_range(text: str) -> list[int]:
    """'start:stop:step', inclusive; an empty or reversed range, or one over ``MAX_SIZES``, is refused."""
    try:
        start, stop, step = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 128,160,192 or 128:384:32, got {text!r}") from None
    if step <= 0:
        raise argparse.ArgumentTypeError(f"the step of {text!r} must be positive, got {step}")
    if stop < start:
        raise argparse.ArgumentTypeError(f"the range {text!r} is empty: stop {stop} is below start {start} "
                                         "(write START:STOP:STEP with START <= STOP)")
    count = (stop - start) // step + 1
    if count > MAX_SIZES:
        raise argparse.ArgumentTypeError(f"{text!r} gives {count} sizes; at most {MAX_SIZES} (use a larger step)")
    return list(range(start, stop + 1, step))


def int_list(text: str) -> list[int]:
    """'128,160,192' or '128:384:32' (start:stop:step, inclusive); each size in 1..MAX_IMAGE_SIZE."""
    text = text.strip()
    if ":" in text:
        values = _size_range(text)
    else:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 128,160,192 or 128:384:32, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    if len(values) > MAX_SIZES:
        raise argparse.ArgumentTypeError(f"{len(values)} sizes given; at most {MAX_SIZES}")
    if max(values) > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"size {max(values)} is over the largest supported size {MAX_IMAGE_SIZE}")
    return values


def float_list(text: str) -> list[float]:
    """'0.875,1.0': crop ratios, each in [MIN_CROP_RATIO, 1]."""
    values = [crop_ratio(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected crop ratios like 0.875,1.0, got {text!r}")
    return values


def rgb_values(text: str) -> list[float]:
    """'0.485,0.456,0.406': one finite number per channel (--mean)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.5,0.5,0.5, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers (R,G,B), got {len(values)} in {text!r}")
    for v in values:
        _finite(v, text)
        if abs(v) > MAX_RGB_VALUE:
            raise argparse.ArgumentTypeError(f"{v:g} in {text!r} is outside [-{MAX_RGB_VALUE:g}, {MAX_RGB_VALUE:g}]: "
                                             "give values in [0, 1] units, e.g. 0.485,0.456,0.406")
    return values


def rgb_std(text: str) -> list[float]:
    """'0.229,0.224,0.225': three finite numbers of at least MIN_STD (--std divides by them)."""
    values = rgb_values(text)
    if any(v < MIN_STD for v in values):
        raise argparse.ArgumentTypeError(f"std values must be at least {MIN_STD:g}, got {text!r} "
                                         "(in [0, 1] units, e.g. 0.229,0.224,0.225)")
    return values


def add_model_args(p: argparse.ArgumentParser, *, model_required: bool = False, random_ok: bool = False,
                   pretrained: bool = True) -> None:
    """--model/--checkpoint/--weights/--pretrained/--num-classes and the data-config overrides.

    ``random_ok``: the command builds random weights on purpose (train, fix); otherwise a bare --model
    is refused unless --random-init. ``pretrained``: offer --pretrained (the command passes it on).
    """
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required, default=None,
                   help="timm or torchvision model name (e.g. resnet50, tf_efficientnet_lite0, torchvision:resnet50)")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="local weights: .safetensors, or a torch file loaded with weights_only=True; "
                        "a fixres export (with fixres.json beside it) needs no other flag")
    g.add_argument("--weights", default=None, metavar="NAME",
                   help="installed registry weights: efficientnet-lite0, efficientnet-lite1, efficientnet-lite2")
    if pretrained:
        g.add_argument("--pretrained", action="store_true",
                       help="timm's or torchvision's own pretrained weights for --model, from their local caches "
                            "(downloaded when online; HF_HUB_OFFLINE=1: cache only); torchvision weights bring "
                            "their own recipe (resize, crop, interpolation, train size)")
    if not random_ok:
        g.add_argument("--random-init", action="store_true",
                       help="use --model with random weights on purpose (refused otherwise: results of random "
                            "weights are meaningless)")
    p.set_defaults(random_ok=random_ok)
    g.add_argument("--ema", action="store_true",
                   help="load the EMA weights of a timm or torchvision training checkpoint (default: the plain "
                        "weights, as timm and torchvision do)")
    g.add_argument("--strict", action="store_true",
                   help="refuse a checkpoint whose weights hold NaN or infinity (default: a warning naming them)")
    g.add_argument("--num-classes", type=positive_int, default=None,
                   help="replace the classifier head with this many outputs (a new data set)")
    g.add_argument("--class-map", default=None, metavar="FILE",
                   help="folder names in class-index order (JSON list/object, or one per line)")
    add_data_layout_args(p)
    d = p.add_argument_group("pre-processing (default: the model's own data config)")
    d.add_argument("--crop-ratio", type=crop_ratio, default=None, help="test_size / resize (default 0.875)")
    d.add_argument("--interpolation", choices=INTERPOLATION_NAMES, default=None,
                   help="resize interpolation (EfficientNet-Lite: bicubic; most others: bilinear)")
    d.add_argument("--mean", type=rgb_values, default=None, metavar="R,G,B",
                   help="normalisation mean per channel, in [0, 1] units")
    d.add_argument("--std", type=rgb_std, default=None, metavar="R,G,B",
                   help="normalisation std per channel, in [0, 1] units")


def add_data_layout_args(p: argparse.ArgumentParser) -> None:
    """--image-column/--label-column: the columns of a Hugging Face dataset (``--data hf:PATH``)."""
    g = p.add_argument_group("data layout (--data: an ImageFolder tree, WebDataset shards, or hf:PATH)")
    g.add_argument("--image-column", default=None, metavar="NAME",
                   help="the image column of an hf:PATH dataset (default: the column of type Image)")
    g.add_argument("--label-column", default=None, metavar="NAME",
                   help="the label column of an hf:PATH dataset (default: the column of type ClassLabel)")


def model_spec(args: argparse.Namespace, *, checkpoint: str | None = None):
    """The ``fixres.models.loading.ModelSpec`` the model flags describe (``checkpoint`` overrides --checkpoint)."""
    from fixres.models.loading import ModelSpec
    random_init = bool(getattr(args, "random_init", False))
    given = checkpoint or args.checkpoint or args.weights or getattr(args, "pretrained", False)
    if random_init and given:
        raise UsageError("--random-init contradicts --checkpoint/--weights/--pretrained: give one")
    return ModelSpec(model=args.model, checkpoint=checkpoint or args.checkpoint, weights=args.weights,
                     pretrained=bool(getattr(args, "pretrained", False)),
                     random_init=random_init or bool(getattr(args, "random_ok", True)),
                     num_classes=args.num_classes, train_size=getattr(args, "train_size", None),
                     ema=bool(getattr(args, "ema", False)), strict=bool(getattr(args, "strict", False)),
                     seed=getattr(args, "seed", None))


def add_dataset_size_args(g) -> None:
    """--classes/--train-per-class/--val-per-class of the embedded data set (make-dataset and fix)."""
    g.add_argument("--classes", type=positive_int, default=DEFAULT_CLASSES,
                   help=f"object classes (2-12, default {DEFAULT_CLASSES})")
    g.add_argument("--train-per-class", type=positive_int, default=DEFAULT_TRAIN_PER_CLASS,
                   help=f"training photos per class (default {DEFAULT_TRAIN_PER_CLASS})")
    g.add_argument("--val-per-class", type=positive_int, default=DEFAULT_VAL_PER_CLASS,
                   help=f"validation photos per class (default {DEFAULT_VAL_PER_CLASS})")


def add_runtime_args(p: argparse.ArgumentParser, *, batch_default: int, batch_note: str = "") -> None:
    """--device/--batch-size/--workers/--no-amp/--seed. ``batch_default`` is the library default the
    command falls back to (stated in --help only; tests check it against the library constant)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per batch (default {batch_default}{batch_note})")
    g.add_argument("--workers", type=nonneg_int, default=None,
                   help="DataLoader workers (default: sized to the machine)")
    g.add_argument("--no-amp", action="store_true", help="fp32: no autocast, no channels_last")
    g.add_argument("--seed", type=seed, default=0,
                   help="random seed (default 0; 0 to 2**32-1): it seeds every random draw, the random "
                        "initialisation included: same seed, same run, whatever --workers")


def add_stream_args(p: argparse.ArgumentParser, *, stream_help: str, epochs: bool = True) -> None:
    """--stream and the flags only streamed shards take (--val-data; for a command with epochs, --train-count and
    --shuffle-buffer); ``stream_wanted`` refuses them without --stream."""
    p.add_argument("--stream", action="store_true", help=stream_help)
    p.add_argument("--val-data", default=None, metavar="SHARDS",
                   help="with --stream: the validation shards (a 'pipe:' value, or local shards; default: the "
                        "val-*.tar shards beside local training shards, none beside a 'pipe:' value)")
    if not epochs:
        return
    p.add_argument("--train-count", type=positive_int, default=None, metavar="N",
                   help="with --stream: the photos the training shards hold (ImageNet: 1281167), which sets the "
                        "epoch's length without a first pass counting them (for a 'pipe:' value, a whole extra "
                        "download)")
    p.add_argument("--shuffle-buffer", type=positive_int, default=None, metavar="N",
                   help="with --stream: photos each process mixes before handing one on (default 1000; their "
                        "bytes are held in memory, about 110 kB each for ImageNet; larger mixes shards written "
                        "in class order better)")


def stream_wanted(args: argparse.Namespace) -> bool:
    """Whether the shards are streamed: --stream, or a ``pipe:`` value in --data or --val-data (it can only be
    streamed). One line when a flag only streamed shards take is given otherwise."""
    from fixres.data.streams import is_stream
    stream = getattr(args, "stream", False) or is_stream(args.data) or is_stream(getattr(args, "val_data", None) or "")
    given = [flag for flag, name in (("--val-data", "val_data"), ("--train-count", "train_count"),
                                     ("--shuffle-buffer", "shuffle_buffer")) if getattr(args, name, None)]
    if given and not stream:
        raise UsageError(f"{given[0]} is for streamed shards: add --stream (indexed data finds its val "
                         "split in --data, counts its photos and shuffles them whole)")
    return stream


def warn_stride(size: int, stride: int, flag: str = "size", *, quiet: bool = False) -> bool:
    """Warn (one line on stderr) when ``size`` is not a multiple of the network ``stride``.

    Appendix B of the paper: such sizes add border/round-off effects in the last feature map. A
    warning, not an error: the size still works. Returns True when it warned.
    """
    if stride <= 0 or size % stride == 0:
        return False
    if not quiet:
        lower, upper = size - size % stride, size - size % stride + stride
        print(f"fixres: warning: {flag} {size} is not a multiple of the network stride {stride} "
              f"(appendix B: prefer {lower or upper} or {upper})", file=sys.stderr)
    return True
