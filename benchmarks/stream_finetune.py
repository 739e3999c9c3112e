"""``fixres finetune`` on the same ImageNet photos as indexed shards, streamed shards (``--stream``) and ``pipe:cat``
commands: the same numbers, and what the stream costs.

imagenet-sample's 1,000 photos are split, evenly spread, into fitting and validation photos and written once to a
scratch folder as tar shards of unequal size (key ``CLASS/STEM``, ``.cls`` the ImageNet class index). Then
``python -m fixres finetune`` fine-tunes EfficientNet-Lite0 (the registry weights, trained at 224) at
``--test-size`` as a whole process on each layout, interleaved over ``--repeats`` rounds (the order rotates each
round): the activation cache's fill, the epochs and the process's wall seconds, and top-1 before and after.

What it shows: with the test DA the streamed shards fill the activation cache in one read and give the indexed
shards' numbers (losses and top-1 equal, checked and printed); the fill reads the bytes in the order the shards
hold them instead of by position, at the same cost. The photos are probably ImageNet training photos: the top-1
is optimistic, and the fine-tuning here is a measurement of the machinery, not of an improvement.

    .venv/bin/python benchmarks/stream_finetune.py [--quick] [--test-size 256] [--epochs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    SHARED,
    STREAM_LAYOUTS,
    rotated,
    split_index,
    spread_sample,
    stream_layouts,
    write_json,
)

LAYOUTS = STREAM_LAYOUTS
WEIGHTS = "efficientnet-lite0"
QUICK_IMAGES = 200
#: Every VAL_EVERY-th photo validates; the others fit.
VAL_EVERY = 3
#: The share of the photos each shard holds, before the last takes the rest: unequal on purpose.
SHARD_SHARES = (0.1, 0.25, 0.15, 0.2)


def run_finetune(data: list[str], args, out: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "fixres", "finetune", *data, "--weights", WEIGHTS, "--test-size",
           str(args.test_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "-q",
           "--no-export", "--out", str(out), "--json"]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"fixres finetune {' '.join(data)} failed (exit {done.returncode}): {done.stderr[-600:]}")
    res = json.loads(done.stdout)
    timing = res["timing"]
    return {"wall_s": wall, "cache_fill_s": timing["cache_build_s"], "epochs_s": timing["epochs_s"],
            "cache_used": res["cache"]["used"], "losses": [r["loss"] for r in res["log"]],
            "before": res["before"]["top1"], "after": res["after"]["top1"], "n_val": res["after"]["n"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "imagenet-sample"))
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} photos, one round")
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stream_finetune.json"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"skipped: real photos not available ({args.data} is absent)")
        return
    photos = split_index(args.data, "val")
    samples = photos.samples if not args.quick else spread_sample(photos.samples, QUICK_IMAGES)
    val = samples[::VAL_EVERY]
    fit = [s for i, s in enumerate(samples) if i % VAL_EVERY]
    repeats = 1 if args.quick else args.repeats
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="fixres-stream-finetune-") as tmp:
        scratch = Path(tmp)
        data = stream_layouts(fit, val, photos.classes, scratch / "shards", SHARD_SHARES)
        rounds = []
        for r in range(repeats):
            order = rotated(LAYOUTS, r)
            row = {k: run_finetune(data[k], args, scratch / f"out-{k}-{r}", env) for k in order}
            rounds.append(row)
            print(f"round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {v['wall_s']:.1f} s (fill {v['cache_fill_s']:.1f} s, top-1 {v['before']:.1f} -> {v['after']:.1f})"
                for k, v in row.items()), flush=True)
    first = rounds[0]["shards"]
    same = all(r[k]["losses"] == first["losses"] and r[k]["after"] == first["after"] for r in rounds for k in LAYOUTS)
    summary = {k: {"wall_s": [r[k]["wall_s"] for r in rounds], "cache_fill_s": [r[k]["cache_fill_s"] for r in rounds],
                   "fill_ratio_to_indexed_median": statistics.median(
                       r[k]["cache_fill_s"] / r["shards"]["cache_fill_s"] for r in rounds),
                   "wall_ratio_to_indexed_median": statistics.median(r[k]["wall_s"] / r["shards"]["wall_s"]
                                                                     for r in rounds)}
               for k in LAYOUTS}
    for k, v in summary.items():
        fill = statistics.median(v["cache_fill_s"])
        print(f"{k:7s} cache fill x{v['fill_ratio_to_indexed_median']:.2f} the indexed shards' "
              f"(median {fill:.1f} s), process x{v['wall_ratio_to_indexed_median']:.2f}")
    print(f"same losses and top-1 on every layout and round: {'yes' if same else 'NO'} "
          f"(before {first['before']:.2f}%, after {first['after']:.2f}% on {first['n_val']} photos)")
    write_json(Path(args.out), {"data": args.data, "fit_photos": len(fit), "val_photos": len(val),
                                "test_size": args.test_size, "epochs": args.epochs, "batch_size": args.batch_size,
                                "weights": WEIGHTS, "repeats": repeats,
                                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "same_numbers": same,
                                "layouts": summary, "rounds": rounds})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
