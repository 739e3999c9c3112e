"""Frozen-prefix activation cache: fine-tuning time with and without it, measured side by side.

Runs ``fixres.method.finetuning.finetune`` twice on the same model and data (classifier + batch-norm, test DA,
same seed): once with the cache (the frozen part runs once), once with the full forward every epoch.
Prints the fine-tuning time of each (cache build + epochs; the before/after evaluations are the same
work for both and reported apart), the ratio (target >= 8x for 10 epochs), and both final accuracies
(which must be equal: same batches, same arithmetic after the cut).

Usage:
  python benchmarks/finetune_cache.py                 # lite0 (registry weights, new 17-class head) on flowers17
  python benchmarks/finetune_cache.py --per-class 20  # a flowers17 subset (20 train images per class)
  python benchmarks/finetune_cache.py --quick         # tiny model on generated images, a few seconds
The flowers17 run needs ../shared/data/flowers17 (or $FIXRES_SHARED_DATA); it stops with a message if absent.

Internal: fixres.method.finetuning - what this measures is the frozen-prefix activation cache, switched on
and off (``cache=``), and its timings; fixres.finetune always uses the cache and evaluates before tuning.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import shared_folder, small_split, split_index

CACHE_TARGET = 8.0


def subset(samples, per_class: int | None):
    if not per_class:
        return list(samples)
    seen: dict[int, int] = {}
    out = []
    for path, label in samples:
        if seen.get(label, 0) < per_class:
            out.append((path, label))
            seen[label] = seen.get(label, 0) + 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on generated images (seconds)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--test-size", type=int, default=None, help="default: the size fixres recommends for 128")
    ap.add_argument("--train-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=None, help="use only this many training images per class")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import fixres
    from fixres.method.finetuning import finetune

    out = Path(args.out or tempfile.mkdtemp(prefix="fixres_cache_bench_"))
    if args.quick:
        torch.set_num_threads(1)
        root = small_split(out, val_per_class=4)
        model_kw = dict(name="fixres_tiny_resnet", num_classes=3, train_size=32, random_init=True)
        test_size, workers, batch = args.test_size or 64, 0, 8
    else:
        root = shared_folder("flowers17")
        if root is None:
            return 0
        model_kw = dict(name="efficientnet-lite0", num_classes=17, train_size=args.train_size)
        test_size = args.test_size or fixres.analyze(args.train_size).recommended_test_size
        workers, batch = args.workers, args.batch_size
    train_idx = split_index(root, "train")
    val_idx = split_index(root, "val", classes=train_idx.classes)
    train = subset(train_idx.samples, args.per_class)
    torch.manual_seed(0)
    base = fixres.load(model_kw.pop("name"), **model_kw)
    precision = None  # the training precision on the CPU (the library's default), as the result names it
    runs = {}
    for name, cache in (("cached", True), ("uncached", False)):
        model = copy.deepcopy(base.model)
        t0 = time.perf_counter()
        res = finetune(model, train, val_idx.samples, base.data_config, test_size=test_size,
                       parts="classifier,bn", augment="test", epochs=args.epochs, batch_size=batch, cache=cache,
                       out_dir=out / name, seed=0, workers=workers, progress=False, evaluate_before=False)
        precision = res["precision"]
        runs[name] = {"finetune_s": res["timing"]["finetune_s"], "wall_s": round(time.perf_counter() - t0, 2),
                      "cache_build_s": res["timing"]["cache_build_s"], "epochs_s": res["timing"]["epochs_s"],
                      "cache": res["cache"], "top1": res["after"]["top1"], "top1_std": res["after"]["top1_std"],
                      "ms_per_batch_forward": res["timing"]["ms_per_batch_forward"],
                      "ms_per_batch_backward": res["timing"]["ms_per_batch_backward"],
                      "final_loss": res["log"][-1]["loss"] if res["log"] else None}
        print(f"{name:>9}: fine-tuning {runs[name]['finetune_s']:.1f} s (wall {runs[name]['wall_s']:.1f} s), "
              f"top-1 {runs[name]['top1']:.2f} ± {runs[name]['top1_std']:.2f}%", file=sys.stderr, flush=True)
    ratio = runs["uncached"]["finetune_s"] / max(1e-9, runs["cached"]["finetune_s"])
    fwd_ratio = (runs["uncached"]["ms_per_batch_forward"]["mean"]
                 / max(1e-9, runs["cached"]["ms_per_batch_forward"]["mean"]))
    result = {"model": base.name, "data": str(root), "train_images": len(train), "val_images": len(val_idx),
              "test_size": test_size, "epochs": args.epochs, "batch_size": batch, "precision": precision,
              "runs": runs, "speedup": ratio, "forward_speedup_per_batch": fwd_ratio, "target": CACHE_TARGET,
              "same_accuracy": runs["cached"]["top1"] == runs["uncached"]["top1"]}
    (out / "finetune_cache.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        c, u = runs["cached"], runs["uncached"]
        print(f"{base.name} on {len(train)} training images, classifier+bn at {test_size}px, {args.epochs} epochs, "
              f"test DA, batch {batch}, {precision}")
        print(f"  {'':>9} {'fine-tune s':>11} {'(cache s':>8} {'epochs s)':>9} {'fwd ms/batch':>12} "
              f"{'bwd ms/batch':>12} {'top-1 %':>16}")
        for name, r in (("cached", c), ("uncached", u)):
            print(f"  {name:>9} {r['finetune_s']:>11.1f} {r['cache_build_s']:>8.1f} {r['epochs_s']:>9.1f} "
                  f"{r['ms_per_batch_forward']['mean']:>12.1f} "
                  f"{r['ms_per_batch_backward']['mean']:>12.1f} {r['top1']:>9.2f} ± {r['top1_std']:.2f}")
        print(f"  speed-up {ratio:.1f}x (target >= {CACHE_TARGET:g}x), forward per batch {fwd_ratio:.1f}x; "
              f"cut at {c['cache'].get('cut')}; "
              f"final accuracies {'equal' if result['same_accuracy'] else 'DIFFER'}")
        print(f"  results: {out / 'finetune_cache.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
