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
(c) with ``--timm-repo PATH`` (a source checkout of timm; nothing of it is copied here): whole processes on
    every photo of the folder, what a user runs and waits for, start-up included: ``python -m fixres eval
    --weights ... --test-size S`` against ``python PATH/validate.py DATA --split val --model ... --checkpoint
    W`` (the same weights saved in timm's layout, the same crop, interpolation, mean/std, batch and workers;
    ``--channels-last`` and bf16 autocast exactly when fixres uses them on this CPU): photos per wall second
    of each whole process, alternating which goes first, median ratio; top-1 as each prints it.

Targets: (a) and (c) >= 1.3 at 128 and 224 at equal top-1; (b) <= 0.8. On a shared machine wall times are
noisy: the spread of the repeats is printed with every median.

    .venv/bin/python benchmarks/timm_validate.py [--quick] [--images N] [--repeats R] [--sizes 128,224]
        [--no-sweep] [--timm-repo PATH [--processes-only]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    REPO,
    SHARED,
    default_workers,
    photos_and_weights,
    precision_for,
    split_index,
    spread_sample,
    write_json,
)

SIZES = (128, 224)
SWEEP_SIZES = (128, 160, 192, 224, 256, 288)
TARGETS = {128: 1.3, 224: 1.3}
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


#: validate.py's summary line: " * Acc@1 TOP1 (ERROR) Acc@5 ..."
TIMM_ACC_LINE = re.compile(r"\*\s*Acc@1\s+([\d.]+)")


def whole_process(cmd: list[str], log: Path, env: dict) -> tuple[float, str]:
    """(wall seconds, its output) of one whole process; a failure ends the benchmark with the output's tail."""
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    log.write_text(done.stdout, encoding="utf-8")
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-8:])
        raise SystemExit(f"{cmd[1]} failed (exit {done.returncode}); its output ends:\n{tail}")
    return seconds, done.stdout


def processes(args, bundle, data: Path, n_photos: int, precision, workers: int, sizes, repeats: int,
              out: Path) -> list[dict]:
    """(c): ``fixres eval`` against timm's ``validate.py`` as whole processes at each size."""
    from safetensors.torch import save_file
    repo = Path(args.timm_repo)
    if not (repo / "validate.py").is_file():
        raise SystemExit(f"--timm-repo {repo}: no validate.py there (give a source checkout of timm)")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{bundle.name}.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in bundle.model.state_dict().items()}, str(weights))
    cfg = bundle.data_config
    env = {**os.environ, "PYTHONPATH": str(repo)}  # timm's script with its own checkout's timm
    fx_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rows = []
    for size in sizes:
        fx_cmd = [sys.executable, "-m", "fixres", "eval", "--weights", args.weights, "--data", str(data),
                  "--test-size", str(size), "--batch-size", str(args.batch_size), "--workers", str(workers),
                  "--device", "cpu", "--out", str(out / f"fixres_{size}")]
        tm_cmd = [sys.executable, str(repo / "validate.py"), str(data), "--split", "val", "--model", bundle.name,
                  "--checkpoint", str(weights), "--img-size", str(size), "--crop-pct", f"{cfg.crop_ratio}",
                  "--interpolation", cfg.interpolation, "--mean", *map(str, cfg.mean), "--std", *map(str, cfg.std),
                  "-b", str(args.batch_size), "-j", str(workers), "--device", "cpu", "--log-freq", "1000000"]
        if precision.channels_last:
            tm_cmd.append("--channels-last")
        if precision.amp:
            tm_cmd += ["--amp", "--amp-dtype", str(precision.dtype).removeprefix("torch.")]
        fx, tm, top = [], [], {}
        for r in range(repeats):
            for side in (("fixres", "timm") if r % 2 == 0 else ("timm", "fixres")):
                seconds, text = whole_process(fx_cmd if side == "fixres" else tm_cmd, out / f"{side}_{size}_{r}.log",
                                              fx_env if side == "fixres" else env)
                if side == "fixres":
                    fx.append(n_photos / seconds)
                    top[side] = json.loads((out / f"fixres_{size}" / "eval.json").read_text())["rows"][0]["top1"]
                else:
                    tm.append(n_photos / seconds)
                    found = TIMM_ACC_LINE.search(text)
                    top[side] = float(found.group(1)) if found else None
        row = _median_row(f"(c) whole process at {size}: photos/s", fx, tm, higher_is_better=True)
        row.update({"test_size": size, "target": TARGETS.get(size), "fixres_top1": top["fixres"],
                    "timm_top1": top["timm"], "n_images": n_photos, "fixres_command": " ".join(fx_cmd[1:]),
                    "timm_command": " ".join(["validate.py"] + tm_cmd[2:])})
        print(f"    top-1 fixres {top['fixres']}, timm {top['timm']} (all {n_photos} photos)", flush=True)
        rows.append(row)
    return rows


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
    ap.add_argument("--sizes", default=None, help=f"test sizes of (a) and (c) (default {','.join(map(str, SIZES))})")
    ap.add_argument("--timm-repo", default=None, help="a source checkout of timm: also (c), whole processes")
    ap.add_argument("--processes-only", action="store_true", help="with --timm-repo: only (c)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    found = photos_and_weights(args.data, args.weights)
    if found is None:
        return 0
    bundle, data = found
    import torch

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

    sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else list(SIZES)
    load_avg_start = os.getloadavg()
    warm = samples[:args.batch_size]
    # untimed: kernels for every shape, both sides; it also names fixres's precision
    precision = fixres_eval(SWEEP_SIZES, subset=warm, workers=0)["precision"]
    print(f"{bundle.name} on {len(samples)} images, batch {args.batch_size}, {workers} workers, "
          f"fixres {precision} vs timm bf16 autocast + channels_last, load avg {load_avg_start[0]:.1f}",
          flush=True)
    result = {"model": bundle.name, "n_images": len(samples), "repeats": repeats, "workers": workers,
              "batch_size": args.batch_size, "fixres_precision": precision, "cpu_count": os.cpu_count(),
              "load_avg_start": load_avg_start, "command": " ".join(["benchmarks/timm_validate.py",
                                                        *(sys.argv[1:] if argv is None else argv)]), "rows": []}
    if args.timm_repo:
        result["rows"] += processes(args, bundle, data, len(index.samples), precision_for(torch.device("cpu")),
                                    workers, sizes, repeats, Path(args.out or REPO / "runs" / "timm_validate").parent
                                    / "timm_validate_processes")
    if args.processes_only:
        return _finish(args, result)
    for size in SWEEP_SIZES:
        timm_run(model, root, warm, size=size, crop_pct=cfg.crop_ratio, interpolation=cfg.interpolation,
                 mean=cfg.mean, std=cfg.std, batch_size=args.batch_size, workers=0)

    for size in sizes:
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
    return _finish(args, result)


def _finish(args, result: dict) -> int:
    result["load_avg_end"] = os.getloadavg()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"timm_validate{'_quick' if args.quick else ''}.json")
    write_json(out, result)
    print(f"wrote {out} (load avg at the end {os.getloadavg()[0]:.1f}; a shared machine: see the spreads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
