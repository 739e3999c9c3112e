"""``fixres eval`` on the same photos in the three data layouts: an ImageFolder tree, WebDataset shards (indexed,
streamed from the files with ``--stream``, and streamed from ``pipe:cat`` commands), a Hugging Face dataset saved
to disk.

The photos of ``--data`` (its val/ split) are written once to a scratch folder as a folder of links to the
originals, as ``--shards`` tar shards of unequal size (key ``CLASS/STEM``, ``.cls`` the class index), and as a
``datasets`` DatasetDict (an ``Image`` column holding the JPEG bytes, a ``ClassLabel`` column). Then
``python -m fixres eval`` runs as a whole process on each, interleaved over ``--repeats`` rounds (the order
rotates each round): wall seconds of the process, the loop's images/s as eval reports it, top-1.

What it shows: reading photos from shards or arrow rows costs what reading files costs (ratio to the folder,
median of the rounds, with its spread), and the numbers are the same (top-1 equal to the photo).

    .venv/bin/python benchmarks/layouts_speed.py [--quick] [--images N] [--size 224] [--repeats 3]
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

from _common import REPO, SHARED, split_index, spread_sample, write_json, write_tar_shards

LAYOUTS = ("folder", "shards", "stream", "pipe", "hf")
QUICK_IMAGES = 100
WEIGHTS = "efficientnet-lite0"
#: Shard sizes are unequal on purpose: the share of the photos each shard holds, before the last takes the rest.
SHARD_SHARES = (0.15, 0.2, 0.3)


def write_layouts(samples, classes, scratch: Path) -> dict[str, list[str]]:
    """The photos as a folder of links, as tar shards and as a saved Hugging Face dataset; the --data flags of
    each layout."""
    folder = scratch / "folder"
    for path, y in samples:
        link = folder / classes[y] / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.abspath(path))
    shards = scratch / "shards"
    n_shards = write_tar_shards(samples, classes, shards, "val", SHARD_SHARES)
    import datasets
    datasets.disable_progress_bars()
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))})
    val = datasets.Dataset.from_dict({"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in samples],
                                      "label": [y for _, y in samples]}, features=feats)
    datasets.DatasetDict({"validation": val}).save_to_disk(str(scratch / "hf"))
    pipe = f"pipe:cat {shards}/val-{{{0:06d}..{n_shards - 1:06d}}}.tar"
    return {"folder": ["--data", str(folder)], "shards": ["--data", str(shards)],
            "stream": ["--data", str(shards), "--stream"], "pipe": ["--data", pipe],
            "hf": ["--data", f"hf:{scratch / 'hf'}"]}


def run_eval(data: list[str], size: int, out: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "fixres", "eval", *data, "--weights", WEIGHTS, "--test-size", str(size),
           "-q", "--out", str(out)]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"fixres eval {' '.join(data)} failed (exit {done.returncode}): {done.stderr[-600:]}")
    result = json.loads((out / "eval.json").read_text())
    return {"wall_s": wall, "images_per_s": result["images_per_s"], "top1": result["rows"][0]["top1"],
            "correct": result["rows"][0]["correct"], "n": result["rows"][0]["n"]}


def summarise(rounds: list[dict]) -> dict:
    out = {}
    for layout in LAYOUTS:
        walls = [r[layout]["wall_s"] for r in rounds]
        rates = [r[layout]["images_per_s"] for r in rounds]
        ratio = [r[layout]["wall_s"] / r["folder"]["wall_s"] for r in rounds]
        out[layout] = {"wall_s_median": statistics.median(walls), "wall_s": walls,
                       "images_per_s_median": statistics.median(rates), "images_per_s": rates,
                       "wall_ratio_to_folder_median": statistics.median(ratio),
                       "wall_ratio_to_folder_spread": [min(ratio), max(ratio)],
                       "top1": rounds[0][layout]["top1"], "correct": rounds[0][layout]["correct"],
                       "n": rounds[0][layout]["n"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "imagenet-sample"))
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} photos, one round")
    p.add_argument("--images", type=int, default=None, help="photos taken, spread over the classes (default: all)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "layouts_speed.json"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"no photos at {args.data}: see ../shared/data/README.md")
    index = split_index(args.data, "val")
    n = QUICK_IMAGES if args.quick else (args.images or len(index.samples))
    samples = sorted(spread_sample(index.samples, n), key=lambda s: (s[1], s[0]))
    repeats = 1 if args.quick else args.repeats
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="fixres-layouts-") as tmp:
        scratch = Path(tmp)
        data = write_layouts(samples, index.classes, scratch)
        rounds = []
        for r in range(repeats):
            order = LAYOUTS[r % len(LAYOUTS):] + LAYOUTS[:r % len(LAYOUTS)]
            row = {layout: run_eval(data[layout], args.size, scratch / f"out-{layout}-{r}", env) for layout in order}
            rounds.append(row)
            print(f"round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {v['wall_s']:.1f} s ({v['images_per_s']:.0f} img/s, top-1 {v['top1']:.1f})"
                for k, v in row.items()), flush=True)
    summary = summarise(rounds)
    for layout, s in summary.items():
        print(f"{layout:7s} wall {s['wall_s_median']:.1f} s, loop {s['images_per_s_median']:.0f} img/s, "
              f"x{s['wall_ratio_to_folder_median']:.2f} the folder's wall time "
              f"(spread {s['wall_ratio_to_folder_spread'][0]:.2f}-{s['wall_ratio_to_folder_spread'][1]:.2f}), "
              f"top-1 {s['top1']:.1f} ({s['correct']}/{s['n']})")
    write_json(Path(args.out), {"data": args.data, "photos": n, "size": args.size, "weights": WEIGHTS,
                                "repeats": repeats, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                "layouts": summary, "rounds": rounds})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
