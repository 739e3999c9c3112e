"""Evaluation speed and fidelity on real photos, measured side by side in one run.

(a) one-pass sweep of 6 test sizes (each image decoded once) vs 6 separate evaluations:
    time ratio sweep / separate (target <= 0.85); the counts must agree exactly.
(b) ``fixres eval`` (``fixres.sweep``: autocast + channels_last, default workers) vs a
    plain fp32 loop (model.eval(), no channels_last, no autocast) on the same images and model, with
    the same DataLoader workers and batch size: images/s ratio (target >= 2.0), top-1 within 0.2 pt.
(c) fidelity: the plain loop's pre-processing is timm's own ``resolve_data_config`` +
    ``create_transform`` at the model's crop_pct, so it is the timm reference; fixres eval's top-1 at
    the model's size must equal it within one image (default precision, and fp32 with --no-amp).

The machine may be shared: each comparison runs its two sides back to back, alternating which goes
first over ``--repeats``, after an untimed warm-up of every input shape; the spread is reported.
Prints a table, writes JSON (--out, default benchmarks/results/eval_speed.json; eval_speed_quick.json with --quick).
Needs ../shared/data/imagenet-sample (or FIXRES_SHARED_DATA) and the efficientnet-lite registry weights.

    .venv/bin/python benchmarks/eval_speed.py [--quick] [--images N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import REPO, SHARED, default_workers, photos_and_weights, split_index, spread_sample, write_json

SWEEP_SIZES = (128, 160, 192, 224, 256, 288)
TARGET_SWEEP_RATIO = 0.85
TARGET_SPEEDUP = 2.0
TARGET_TOP1_PT = 0.2
QUICK_IMAGES = 100
FULL_IMAGES = 1000



def plain_fp32_loop(model, samples, *, batch_size, workers):
    """The baseline a user would write: timm's own eval transform, fp32, contiguous, model.eval()."""
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)

    class Photos(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            path, label = samples[i]
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")  # torchvision's ImageFolder loader
            return transform(img), label

    loader = torch.utils.data.DataLoader(Photos(), batch_size=batch_size, num_workers=workers)
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    correct = seen = 0
    start = time.perf_counter()
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    seconds = time.perf_counter() - start
    return {"top1": 100.0 * correct / seen, "correct": correct, "n": seen, "seconds": seconds,
            "images_per_s": seen / seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, one repeat")
    ap.add_argument("--images", type=int, default=None, help=f"images to use (default {FULL_IMAGES})")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of each comparison (default 2, quick 1)")
    ap.add_argument("--weights", default="efficientnet-lite0")
    ap.add_argument("--data", default=str(SHARED / "imagenet-sample"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers for both sides (default: fixres's)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    ap.add_argument("--out", default=None,
                    help="result JSON (default benchmarks/results/eval_speed.json, or eval_speed_quick.json)")
    args = ap.parse_args(argv)

    found = photos_and_weights(args.data, args.weights)
    if found is None:
        return 0
    bundle, data = found
    import torch

    import fixres
    n_images = args.images or (QUICK_IMAGES if args.quick else FULL_IMAGES)
    repeats = args.repeats or (1 if args.quick else 2)
    workers = default_workers() if args.workers is None else args.workers
    skip = set(filter(None, args.skip.split(",")))
    samples = spread_sample(split_index(data, "val").samples, n_images)
    model, cfg = bundle.model.eval(), bundle.data_config
    size = cfg.train_size
    load_avg_start = os.getloadavg()

    def fixres_eval(sizes, *, amp=True, subset=samples) -> dict:
        """``fixres eval`` on the CPU: its precision (``amp``: autocast where the CPU runs it natively, else fp32),
        the workers and batch of both sides; the library's JSON-ready result (``SweepResult.to_json()``)."""
        return fixres.sweep(bundle, subset, list(sizes), batch_size=args.batch_size, device="cpu", amp=amp,
                            workers=workers, progress=False).to_json()

    # Warm-up (untimed): oneDNN builds kernels per input shape and precision on first use, so run
    # every shape the timed runs will see (a full batch and the last, partial one) once.
    warm_sets = [samples[:args.batch_size]] + ([samples[:len(samples) % args.batch_size]]
                                               if len(samples) % args.batch_size else [])
    precision = None  # fixres's precision, as its result names it
    for warm in warm_sets:
        precision = fixres_eval(SWEEP_SIZES, subset=warm)["precision"]
        if "c" not in skip:
            fixres_eval([size], amp=False, subset=warm)
        if "b" not in skip or "c" not in skip:
            plain_fp32_loop(model, warm, batch_size=args.batch_size, workers=0)
    result = {"model": bundle.name, "weights": args.weights, "n_images": len(samples), "repeats": repeats,
              "workers": workers, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "precision": precision, "cpu_count": os.cpu_count(),
              "load_avg_start": load_avg_start}
    print(f"{bundle.name} on {len(samples)} images, batch {args.batch_size}, {workers} workers, "
          f"{torch.get_num_threads()} threads, fixres precision: {precision}, load avg {load_avg_start[0]:.1f}",
          flush=True)

    if "a" not in skip:
        runs = []
        for r in range(repeats):
            order = ("sweep", "separate") if r % 2 == 0 else ("separate", "sweep")
            times, counts = {}, {}
            for side in order:
                t = time.perf_counter()
                if side == "sweep":
                    res = fixres_eval(SWEEP_SIZES)
                    counts[side] = [row["correct"] for row in res["rows"]]
                else:
                    counts[side] = [fixres_eval([s])["rows"][0]["correct"] for s in SWEEP_SIZES]
                times[side] = time.perf_counter() - t
            runs.append({"sweep_s": times["sweep"], "separate_s": times["separate"],
                         "ratio": times["sweep"] / times["separate"], "first": order[0],
                         "counts_equal": counts["sweep"] == counts["separate"], "correct": counts["sweep"]})
            print(f"(a) repeat {r + 1}: sweep {times['sweep']:.1f} s, 6 separate {times['separate']:.1f} s, "
                  f"ratio {runs[-1]['ratio']:.3f} (counts equal: {runs[-1]['counts_equal']})", flush=True)
        ratios = [x["ratio"] for x in runs]
        result["a_sweep_vs_separate"] = {
            "sizes": list(SWEEP_SIZES), "runs": runs, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "target": TARGET_SWEEP_RATIO,
            "top1_by_size": {s: 100.0 * c / len(samples) for s, c in zip(SWEEP_SIZES, runs[0]["correct"])},
            "pass": statistics.median(ratios) <= TARGET_SWEEP_RATIO and all(x["counts_equal"] for x in runs)}

    if "b" not in skip or "c" not in skip:
        runs = []
        for r in range(repeats):
            order = ("fixres", "plain") if r % 2 == 0 else ("plain", "fixres")
            out = {}
            for side in order:
                if side == "fixres":
                    res = fixres_eval([size])
                    out[side] = {"top1": res["rows"][0]["top1"], "correct": res["rows"][0]["correct"],
                                 "images_per_s": res["images_per_s"], "seconds": res["seconds"]}
                else:
                    out[side] = plain_fp32_loop(model, samples, batch_size=args.batch_size, workers=workers)
            speedup = out["fixres"]["images_per_s"] / out["plain"]["images_per_s"]
            runs.append({"fixres": out["fixres"], "plain_fp32": out["plain"], "speedup": speedup, "first": order[0]})
            print(f"(b) repeat {r + 1}: fixres eval {out['fixres']['images_per_s']:.1f} img/s "
                  f"(top-1 {out['fixres']['top1']:.2f}), plain fp32 {out['plain']['images_per_s']:.1f} img/s "
                  f"(top-1 {out['plain']['top1']:.2f}), ratio {speedup:.2f}", flush=True)
        speedups = [x["speedup"] for x in runs]
        top1_diff = runs[0]["fixres"]["top1"] - runs[0]["plain_fp32"]["top1"]
        result["b_fixres_vs_plain_fp32"] = {
            "test_size": size, "runs": runs, "speedup_median": statistics.median(speedups),
            "speedup_min": min(speedups), "speedup_max": max(speedups), "target": TARGET_SPEEDUP,
            "top1_diff_pt": top1_diff, "top1_target_pt": TARGET_TOP1_PT,
            "pass": statistics.median(speedups) >= TARGET_SPEEDUP and abs(top1_diff) <= TARGET_TOP1_PT}
        if "c" not in skip:
            ref = runs[0]["plain_fp32"]
            res32 = fixres_eval([size], amp=False)["rows"][0]
            diff_amp = runs[0]["fixres"]["correct"] - ref["correct"]
            diff_fp32 = res32["correct"] - ref["correct"]
            result["c_timm_reference"] = {
                "test_size": size, "crop_pct": cfg.crop_ratio, "reference_correct": ref["correct"],
                "reference_top1": ref["top1"], "fixres_correct": runs[0]["fixres"]["correct"],
                "fixres_fp32_correct": res32["correct"], "diff_images": diff_amp, "diff_images_fp32": diff_fp32,
                "pass": abs(diff_amp) <= 1 and abs(diff_fp32) <= 1}
            print(f"(c) timm reference {ref['correct']}/{ref['n']}, fixres eval {runs[0]['fixres']['correct']} "
                  f"({precision}), fixres eval --no-amp {res32['correct']}", flush=True)

    result["load_avg_end"] = os.getloadavg()
    print("\n" + table(result))
    if args.out is None:  # a --quick run never overwrites the full result
        args.out = str(REPO / "benchmarks" / "results" / f"eval_speed{'_quick' if args.quick else ''}.json")
    write_json(args.out, result)
    print(f"results: {args.out}")
    return 0


def table(result: dict) -> str:
    lines = [f"{'comparison':<44} {'measured':>22} {'target':>10} {'ok':>4}"]
    a = result.get("a_sweep_vs_separate")
    if a:
        lines.append(f"{'(a) 6-size sweep / 6 separate evals (time)':<44} "
                     f"{a['ratio_median']:>8.3f} [{a['ratio_min']:.3f}-{a['ratio_max']:.3f}] "
                     f"{'<= ' + str(a['target']):>10} {'yes' if a['pass'] else 'NO':>4}")
    b = result.get("b_fixres_vs_plain_fp32")
    if b:
        lines.append(f"{'(b) fixres eval / plain fp32 (images/s)':<44} "
                     f"{b['speedup_median']:>8.2f} [{b['speedup_min']:.2f}-{b['speedup_max']:.2f}]   "
                     f"{'>= ' + str(b['target']):>10} {'yes' if b['pass'] else 'NO':>4}")
        lines.append(f"{'    top-1 difference (pt)':<44} {b['top1_diff_pt']:>+22.2f} "
                     f"{'<= ' + str(b['top1_target_pt']):>10}")
    c = result.get("c_timm_reference")
    if c:
        lines.append(f"{'(c) fixres eval - timm reference (images)':<44} "
                     f"{c['diff_images']:>+10d} (fp32 {c['diff_images_fp32']:+d})   {'<= 1':>10} "
                     f"{'yes' if c['pass'] else 'NO':>4}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
