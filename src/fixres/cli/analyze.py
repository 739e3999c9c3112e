"""``fixres analyze``: apparent object sizes and the recommended test (or train) size."""

from __future__ import annotations

from fixres.cli.args import add_data_layout_args, bounded_int, crop_ratio, image_size, positive_int, seed, warn_stride
from fixres.config import DEFAULT_STRIDE, DEFAULT_TRAIN_SIZE, default_out

#: Most Monte-Carlo samples: the estimate holds about a dozen float64 arrays of one value per sample, so ten
#: million samples already take over a gigabyte (1e11 is an out-of-memory kill, not a better estimate).
MAX_SAMPLES = 10_000_000


def add_parser(sub, parents):
    p = sub.add_parser(
        "analyze", parents=parents,
        help="apparent object size ratio and the recommended test size (no model needed)",
        description="Closed form of the paper's eq. (5) and a Monte-Carlo estimate that samples the real "
                    "RandomResizedCrop; recommends the test size whose apparent object sizes match training.")
    p.add_argument("--train-size", type=image_size, default=DEFAULT_TRAIN_SIZE,
                   help=f"training crop size T (default {DEFAULT_TRAIN_SIZE})")
    p.add_argument("--crop-ratio", type=crop_ratio, default=0.875, help="test_size / resize (default 0.875 = 224/256)")
    p.add_argument("--stride", type=positive_int, default=DEFAULT_STRIDE,
                   help=f"round test sizes to this multiple (appendix B; default {DEFAULT_STRIDE})")
    p.add_argument("--test-size", type=image_size, default=None,
                   help="also report the train size to use for this target test size")
    p.add_argument("--image-sizes", default=None, metavar="WxH,...",
                   help="photo sizes for the Monte-Carlo estimate (default 500x500, square)")
    p.add_argument("--data", default=None, metavar="DIR", help="measure photo sizes from an "
                   "ImageFolder tree, WebDataset shards or hf:PATH")
    add_data_layout_args(p)
    p.add_argument("--samples", type=bounded_int(MAX_SAMPLES, "Monte-Carlo sample count"), default=100_000,
                   help=f"Monte-Carlo samples (default 100000, at most {MAX_SAMPLES})")
    p.add_argument("--seed", type=seed, default=0, help="Monte-Carlo seed (default 0; 0 to 2**32-1)")
    p.add_argument("--train-augment", choices=("train", "control"), default="train",
                   help="how the model was trained: train = RandomResizedCrop over --train-scale (default); "
                        "control = resize + fixed-size random crop (appendix D: objects keep their size, ratio 1)")
    p.add_argument("--train-scale", type=_scale_range, default=None, metavar="MIN,MAX",
                   help="RandomResizedCrop's area range in training (default 0.08,1)")
    p.add_argument("--plot", action="store_true", help="write the RoC-area histogram (figure 2) PNG to --out")
    return p


def _scale_range(text: str) -> tuple[float, float]:
    import argparse
    import math
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, e.g. 0.08,1, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 1):
        raise argparse.ArgumentTypeError(f"the scale range needs 0 < MIN <= MAX <= 1, got {text!r}")
    return lo, hi


def _photo_sizes(args) -> tuple[list[tuple[int, int]], list[dict] | None]:
    """The photo sizes the Monte Carlo samples: read from --data's headers (with the files skipped), given by
    --image-sizes, or one square 500 px photo."""
    from pathlib import Path

    from fixres.errors import UsageError
    from fixres.method import analysis
    if not args.data:
        return (analysis.parse_image_sizes(args.image_sizes) if args.image_sizes else [(500, 500)]), None
    from fixres.data.images import probe_size
    from fixres.method.inputs import index_folder
    sizes, skipped = [], []
    for path, _ in index_folder(args.data).samples:
        size, reason = probe_size(path)
        if size is None:
            skipped.append({"path": path, "reason": reason})
        else:
            sizes.append(size)
    if not sizes:
        raise UsageError(f"no readable image in {args.data} ({len(skipped)} files skipped, e.g. "
                         f"{Path(skipped[0]['path']).name}: {skipped[0]['reason']})")
    return sizes, skipped


def run(args):
    from pathlib import Path

    from fixres.errors import UsageError
    from fixres.method import analysis

    sizes, skipped = _photo_sizes(args)
    if args.train_scale is not None and args.train_augment != analysis.RRC_AUGMENT:
        raise UsageError("--train-scale is RandomResizedCrop's range; the control augmentation has none")
    result = analysis.analyze(train_size=args.train_size, crop_ratio=args.crop_ratio, stride=args.stride,
                              image_sizes=sizes, samples=args.samples, seed=args.seed,
                              target_test_size=args.test_size, train_augment=args.train_augment,
                              **({"scale": args.train_scale} if args.train_scale else {}))
    mc = result.pop("_mc")
    if args.test_size is not None:
        warn_stride(args.test_size, args.stride, "--test-size", quiet=args.quiet)
    if skipped is not None:
        result["n_images"] = len(sizes)
        result["skipped"] = skipped
    if args.plot:
        from fixres.report.plots import plot_roc_areas
        out = Path(args.out or default_out("analyze"))
        result["plot"] = str(plot_roc_areas(mc.train_area_fraction, mc.test_area_fraction,
                                            out / "roc_areas.png", ratios=mc.ratios))
    return result, _summary(args, result, len(sizes), skipped)


def _summary(args, result: dict, n_sizes: int, skipped: list[dict] | None) -> str:
    """The terminal text: the ratio (closed form and Monte Carlo), the recommendation, the inverse, skips."""
    from fixres.method import analysis

    m = result["monte_carlo"]
    rrc = result["train_augment"] == analysis.RRC_AUGMENT
    trained = (f"RandomResizedCrop over {result['train_scale'][0]:g}-{result['train_scale'][1]:g} of the area"
               if rrc else f"control: resize {result['test_resize']} + random crop, no scale change")
    lines = [
        f"train {args.train_size}px ({trained}), test resize {result['test_resize']} + crop {args.train_size}px "
        f"(crop ratio {args.crop_ratio}):",
        f"  objects look {result['ratio_closed_form']:.4f}x as large at test time (closed form"
        + (", eq. 5; square photos, aspect 1)" if rrc else ")"),
        f"  Monte Carlo over {n_sizes} photo size(s), real RandomResizedCrop: mean {m['mean']:.4f}, "
        f"median {m['quantiles']['0.5']:.4f}, 5-95% {m['quantiles']['0.05']:.2f}-{m['quantiles']['0.95']:.2f}",
        f"  (with the aspect ratio held at 1, as eq. 5 assumes: {m['mean_aspect1']:.4f}; RandomResizedCrop's "
        f"aspect jitter rejects large crops more often, so objects look smaller still)",
        f"  recommended test size: {result['recommended_test_size']}px "
        f"(exact {result['recommended_test_size_exact']:.1f}, multiple of {args.stride}); "
        f"Monte Carlo suggests {m['recommended_test_size']}px",
    ]
    if "for_test_size" in result:
        inv = result["for_test_size"]
        lines.append(f"  to test at {inv['test_size']}px, train at {inv['train_size']}px "
                     f"(exact {inv['train_size_exact']:.1f})")
    if skipped:
        lines.append(f"  skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]['path']}: {skipped[0]['reason']}")
    if "plot" in result:
        lines.append(f"  RoC-area histogram: {result['plot']}")
    return "\n".join(lines)
