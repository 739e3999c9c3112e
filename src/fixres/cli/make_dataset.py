"""``fixres make-dataset``: generate the embedded data set (the paper's imaging model, no download)."""

from __future__ import annotations

from fixres.cli.args import add_dataset_size_args, nonneg_int, seed
from fixres.config import default_out


def add_parser(sub, parents):
    p = sub.add_parser(
        "make-dataset", parents=parents, help="generate the embedded data set",
        description="Generate photos following the paper's imaging model (section 3.1): K classes of objects "
                    "that differ in shape and texture, one per photo, at a random distance (apparent size "
                    "r = f R / Z, f proportional to sqrt(H W)), framed near the centre on cluttered backgrounds; "
                    "photos of a few hundred pixels, 4:3, 3:4, 16:9 or square. Written as JPEG ImageFolder "
                    "OUT/train/CLASS and OUT/val/CLASS. The same seed gives byte-identical files.")
    add_dataset_size_args(p)
    p.add_argument("--seed", type=seed, default=0, help="same seed, same bytes (default 0; 0 to 2**32-1)")
    p.add_argument("--workers", type=nonneg_int, default=None, help="processes drawing photos (default: cores)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is in --out")
    return p


def run(args):
    from fixres.data.synth import make_dataset
    out = args.out or default_out("make-dataset")
    result = make_dataset(out, classes=args.classes, train_per_class=args.train_per_class,
                          val_per_class=args.val_per_class, seed=args.seed, overwrite=args.overwrite,
                          workers=args.workers, progress=not args.quiet)
    fr = result["object_fraction"]
    # make_dataset writes "reused" always and "seconds" whenever it generated
    verb = "reused" if result["reused"] else f"generated in {result['seconds']:.1f}s"
    text = (f"{result['root']}: {result['counts']['train']} train + {result['counts']['val']} val photos, "
            f"{len(result['classes'])} classes ({verb})\n"
            f"  apparent object size r / sqrt(HW): median {fr['quantiles']['0.5']:.2f}, "
            f"5-95% {fr['quantiles']['0.05']:.2f}-{fr['quantiles']['0.95']:.2f}")
    return result, text
