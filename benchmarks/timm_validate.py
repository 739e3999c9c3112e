"""``fixres eval`` against timm's own validation path, side by side in one run.

The peer is what timm's ``validate.py`` does with its best CPU flags (``--amp --amp-dtype bfloat16
--channels-last``): timm's ``ImageDataset`` folder reader + ``create_loader`` (its eval transform at
the same crop_pct and interpolation, no prefetcher on CPU), the model in channels_last, and
``torch.autocast(bfloat16)`` around the forward. (``validate.py`` itself is a script of timm's
repository, not part of the installed package, so its loop is rebuilt here from the same parts.)
fixres runs ``fixres.sweep`` (what ``fixres eval`` runs) at its default precision. Same images, same weights, the
same DataLoader workers and batch size.

(a) one test size at a time (128 and 224): images/s of each, interleaved repeats (the two sides
    alternate which goes first), median ratio fixres / timm; top-1 of each.
(b) a 6-size sweep (128 to 288) in one fixres call (each image decoded once) against 6 timm runs:
    time ratio fixres / timm.

Targets: (a) >= 1.2 at 128, >= 1.0 at 224 at equal top-1; (b) <= 0.8. On a shared
machine wall times are noisy: the spread of the repeats is printed with every median.

    .venv/bin/python benchmarks/timm_validate.py [--quick] [--images N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _common import REPO, SHARED, default_workers, photos_and_weights, split_index, spread_sample, write_json

SIZES = (128, 224)
SWEEP_SIZES = (128, 160, 192, 224, 256, 288)
TARGETS = {128: 1.2, 224: 1.0}
TARGET_SWEEP_RATIO = 0.8
QUICK_IMAGES = 100
FULL_IMAGES = 1000



def timm_run(model, root: Path, samples, *, size: int, crop_pct: float, interpolation: str, mean, std,
             batch_size: int, workers: int) -> dict:
    """timm's validate loop with --amp --amp-dtype bfloat16 --channels-last, on CPU."""
    import torch
    from timm.data import ImageDataset, create_loader

    ds = ImageDataset(str(root))
    ds.reader.samples = list(samples)  # exactly the picked photos, with fixres's (ImageNet-order) labels
    loader = create_loader(ds, input_size=(3, size, size), batch_size=batch_size, is_training=False,
                           use_prefetcher=False, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
                           num_workers=workers, crop_pct=crop_pct, crop_mode="center", device=torch.device("cpu"),
                           persistent_workers=False)
    model = model.to(memory_format=torch.channels_last).eval()
    correct = seen = 0
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in loader:
            out = model(x.contiguous(memory_format=torch.channels_last))
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
    seconds = time.perf_counter() - start
    return {"correct": correct, "n": seen, "top1": 100.0 * correct / max(seen, 1), "seconds": seconds,
            "images_per_s": seen / seconds}


def _median_row(name: str, fx: list[float], tm: list[float], *, higher_is_better: bool) -> dict:
    ratios = [a / b for a, b in zip(fx, tm)]
    row = {"comparison": name, "fixres": fx, "timm": tm, "ratio_median": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios), "higher_is_better": higher_is_better}
    print(f"{name:34s} ratio {row['ratio_median']:.2f} (spread {row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
          flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, 2 repeats")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="repeats of each comparison (default 3, quick 2)")
    ap.add_argument("--weights", default="efficientnet-lite0")
    ap.add_argument("--data", default=str(SHARED / "imagenet-sample"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers, both sides (default: fixres's)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    found = photos_and_weights(args.data, args.weights)
    if found is None:
        return 0
    bundle, data = found
    import fixres
    n_images = args.images or (QUICK_IMAGES if args.quick else FULL_IMAGES)
    repeats = args.repeats or (2 if args.quick else 3)
    workers = default_workers() if args.workers is None else args.workers
    index = split_index(data, "val")
    root = index.root
    samples = spread_sample(index.samples, n_images)
    model, cfg = bundle.model.eval(), bundle.data_config

    def fixres_eval(sizes, subset=samples, workers=workers) -> dict:
        """``fixres eval`` on the CPU at its default precision: the library's JSON-ready result."""
        return fixres.sweep(bundle, subset, list(sizes), batch_size=args.batch_size, device="cpu",
                            workers=workers, progress=False).to_json()

    def fixres_timed(sizes):
        t = time.perf_counter()
        res = fixres_eval(sizes)
        return time.perf_counter() - t, res

    def timm(size):
        return timm_run(model, root, samples, size=size, crop_pct=cfg.crop_ratio, interpolation=cfg.interpolation,
                        mean=cfg.mean, std=cfg.std, batch_size=args.batch_size, workers=workers)

    load_avg_start = os.getloadavg()
    warm = samples[:args.batch_size]
    # untimed: kernels for every shape, both sides; it also names fixres's precision
    precision = fixres_eval(SWEEP_SIZES, subset=warm, workers=0)["precision"]
    print(f"{bundle.name} on {len(samples)} images, batch {args.batch_size}, {workers} workers, "
          f"fixres {precision} vs timm bf16 autocast + channels_last, load avg {load_avg_start[0]:.1f}",
          flush=True)
    result = {"model": bundle.name, "n_images": len(samples), "repeats": repeats, "workers": workers,
              "batch_size": args.batch_size, "fixres_precision": precision, "cpu_count": os.cpu_count(),
              "load_avg_start": load_avg_start, "command": "benchmarks/timm_validate.py"
              + (" --quick" if args.quick else ""), "rows": []}
    for size in SWEEP_SIZES:
        timm_run(model, root, warm, size=size, crop_pct=cfg.crop_ratio, interpolation=cfg.interpolation,
                 mean=cfg.mean, std=cfg.std, batch_size=args.batch_size, workers=0)

    for size in SIZES:
        fx, tm, top = [], [], {}
        for r in range(repeats):
            for side in (("fixres", "timm") if r % 2 == 0 else ("timm", "fixres")):
                if side == "fixres":
                    seconds, res = fixres_timed([size])
                    fx.append(len(samples) / seconds)
                    top["fixres"] = res["rows"][0]["top1"]
                else:
                    out = timm(size)
                    tm.append(out["images_per_s"])
                    top["timm"] = out["top1"]
        row = _median_row(f"(a) eval at {size}: images/s", fx, tm, higher_is_better=True)
        row.update({"test_size": size, "target": TARGETS[size], "fixres_top1": top["fixres"], "timm_top1": top["timm"]})
        print(f"    top-1 fixres {top['fixres']:.1f}, timm {top['timm']:.1f} (one image = "
              f"{100.0 / len(samples):.2f} pt)", flush=True)
        result["rows"].append(row)

    if not args.no_sweep:
        fx, tm, top = [], [], {}
        for r in range(repeats):
            for side in (("fixres", "timm") if r % 2 == 0 else ("timm", "fixres")):
                if side == "fixres":
                    seconds, res = fixres_timed(SWEEP_SIZES)
                    fx.append(seconds)
                    top["fixres"] = [row["top1"] for row in res["rows"]]
                else:
                    runs = [timm(s) for s in SWEEP_SIZES]
                    tm.append(sum(run["seconds"] for run in runs))
                    top["timm"] = [run["top1"] for run in runs]
        row = _median_row("(b) 6-size sweep vs 6 timm runs: time", fx, tm, higher_is_better=False)
        row.update({"sizes": list(SWEEP_SIZES), "target": TARGET_SWEEP_RATIO, "fixres_top1": top["fixres"],
                    "timm_top1": top["timm"]})
        print("    top-1 by size, fixres / timm: " + ", ".join(
            f"{s} {a:.1f}/{b:.1f}" for s, a, b in zip(SWEEP_SIZES, top["fixres"], top["timm"])), flush=True)
        result["rows"].append(row)
    result["load_avg_end"] = os.getloadavg()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"timm_validate{'_quick' if args.quick else ''}.json")
    write_json(out, result)
    print(f"wrote {out} (load avg at the end {os.getloadavg()[0]:.1f}; a shared machine: see the spreads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
