"""``fixres train`` on the same photos as indexed shards, streamed shards (``--stream``) and ``pipe:cat`` commands.

The training photos of ``--data`` (flowers17's train/, its val/ for validation) are written once to a scratch
folder as tar shards of unequal size (key ``CLASS/STEM``, ``.cls`` the class index). Then ``python -m fixres
train`` runs as a whole process on each layout, interleaved over ``--repeats`` rounds (the order rotates each
round): the training loop's images/s as the epoch's log reports it, the process's wall seconds, val top-1.

What it shows: reading the training photos as a stream (each process reading its shards' bytes itself, the loader
workers decoding them) costs what reading them by position costs. The streamed order is not the indexed one, so
the weights differ: the top-1 of the layouts differ by noise (the binomial SE is printed).

    .venv/bin/python benchmarks/stream_train_speed.py [--quick] [--epochs 1] [--train-size 128] [--repeats 2]
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
    binomial_se,
    rotated,
    split_index,
    spread_sample,
    stream_layouts,
    write_json,
)

LAYOUTS = STREAM_LAYOUTS
WEIGHTS = "efficientnet-lite0"
QUICK_IMAGES = 160
#: Shard sizes are unequal on purpose: the share of the photos each shard holds, before the last takes the rest.
SHARD_SHARES = (0.1, 0.15, 0.2, 0.1, 0.15)


def run_train(data: list[str], args, num_classes: int, out: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "fixres", "train", *data, "--weights", WEIGHTS, "--num-classes", str(num_classes),
           "--train-size", str(args.train_size), "--val-sizes", str(args.train_size), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--epoch-length-factor", "1", "-q",
           "--out", str(out)]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"fixres train {' '.join(data)} failed (exit {done.returncode}): {done.stderr[-600:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = log[-1]
    return {"wall_s": wall, "images_per_s": statistics.median(r["images_per_s"] for r in log),
            "top1": last["val_top1_train_size"], "n_val": last["val_n"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "flowers17"))
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} training photos, one round")
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stream_train_speed.json"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"no photos at {args.data}: see ../shared/data/README.md")
    train, val = split_index(args.data, "train"), split_index(args.data, "val", classes=None)
    samples = train.samples if not args.quick else spread_sample(train.samples, QUICK_IMAGES)
    repeats = 1 if args.quick else args.repeats
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="fixres-stream-train-") as tmp:
        scratch = Path(tmp)
        data = stream_layouts(samples, val.samples, train.classes, scratch / "shards", SHARD_SHARES,
                              val_classes=val.classes)
        rounds = []
        for r in range(repeats):
            order = rotated(LAYOUTS, r)
            row = {k: run_train(data[k], args, len(train.classes), scratch / f"out-{k}-{r}", env) for k in order}
            rounds.append(row)
            print(f"round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {v['wall_s']:.0f} s ({v['images_per_s']:.1f} img/s, top-1 {v['top1']:.1f})"
                for k, v in row.items()), flush=True)
    summary = {}
    for k in LAYOUTS:
        rates = [r[k]["images_per_s"] for r in rounds]
        ratio = [r[k]["images_per_s"] / r["shards"]["images_per_s"] for r in rounds]
        top = statistics.mean(r[k]["top1"] for r in rounds)
        n = rounds[0][k]["n_val"]
        summary[k] = {"images_per_s": rates, "images_per_s_median": statistics.median(rates),
                      "ratio_to_indexed_median": statistics.median(ratio), "ratio_spread": [min(ratio), max(ratio)],
                      "wall_s": [r[k]["wall_s"] for r in rounds], "top1": [r[k]["top1"] for r in rounds],
                      "top1_se": binomial_se(top, n),
                      "n_val": n}
        print(f"{k:7s} {summary[k]['images_per_s_median']:.1f} img/s, x{summary[k]['ratio_to_indexed_median']:.2f} "
              f"the indexed shards' (spread {min(ratio):.2f}-{max(ratio):.2f}), top-1 "
              f"{', '.join(f'{t:.1f}' for t in summary[k]['top1'])} (± {summary[k]['top1_se']:.1f} SE)")
    write_json(Path(args.out), {"data": args.data, "train_photos": len(samples), "train_size": args.train_size,
                                "epochs": args.epochs, "batch_size": args.batch_size, "weights": WEIGHTS,
                                "repeats": repeats, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                "layouts": summary, "rounds": rounds})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
