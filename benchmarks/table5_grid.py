"""Table 5 (and appendix D's table 9) on the embedded data set: train size x test size, with and without the fix.

For each train size T, a small built-in CNN is trained from scratch with RandomResizedCrop ("train DA"),
then evaluated at every test size (table 5, left). The fix (classifier + bn fine-tuned with test DA,
cached) is applied at each test size >= T and measured there (table 5, right). The control of
appendix D trains the same network with a resize and a fixed-size random crop instead of
RandomResizedCrop (table 9): the paper finds that the gain from testing above T comes mainly from
RandomResizedCrop, so the control should show a much weaker shift or none.

Every number is top-1 (%) on the validation images with the leave-one-fold-out std (10 folds).
Trainings are cached under --out (rerunning continues/reuses them). Writes the JSON (--json-out) and
a ``grid.json`` that ``fixres report`` shows as heatmaps when copied into a run folder (--report-run).

    python benchmarks/table5_grid.py --quick          # train 64, 96 (+ control): ~13 CPU-minutes
    python benchmarks/table5_grid.py                  # train 64, 96, 128, fix at every size >= T

Internal: fixres.method.train - the grid trains each network from scratch at T, plain and with appendix D's
control augmentation; the public API has no training function. Building and evaluating go through the public
API (``fixres.load``, ``fixres.sweep``); the embedded data set and the fix (fine-tuning resumed from --out
without the evaluation before: fixres.finetune always evaluates first and never resumes) come from
benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import REPO, finetune, make_dataset, split_index, write_json

from fixres.method.train import train

FULL = dict(train_sizes=(64, 96, 128), test_sizes=(48, 64, 80, 96, 112, 128, 160, 192, 224), epochs=30,
            finetune_epochs=10, classes=10, train_per_class=150, val_per_class=50, fix_every=True)
QUICK = dict(train_sizes=(64, 96), test_sizes=(48, 64, 96, 128, 160, 192), epochs=20, finetune_epochs=5,
             classes=10, train_per_class=150, val_per_class=50, fix_every=False)
#: --quick fixes at T and at the next FIX_ABOVE test sizes above T (the full run fixes at every size >= T).
FIX_ABOVE = 2
MODEL = "fixres_tiny_resnet"
TRAIN_BATCH = 64
TRAIN_LR = 0.2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two train sizes, fewer epochs, fix at a few sizes")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "table5"), help="cache of data and trainings")
    p.add_argument("--json-out", default=None, help="result JSON (default OUT/table5_grid.json)")
    p.add_argument("--report-run", default=None, metavar="RUN_DIR",
                   help="also write RUN_DIR/grid.json (and rebuild RUN_DIR's report with the heatmaps)")
    p.add_argument("--train-sizes", default=None, help="comma list, overrides the preset")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-control", action="store_true", help="skip the appendix D control")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _row(sweep: dict, size: int) -> dict:
    return next(r for r in sweep["rows"] if r["test_size"] == size)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import fixres

    preset = dict(QUICK if args.quick else FULL)
    if args.train_sizes:
        preset["train_sizes"] = tuple(int(s) for s in args.train_sizes.split(","))
    if args.epochs:
        preset["epochs"] = args.epochs
    out = Path(args.out) / ("quick" if args.quick else "full")
    t_start = time.perf_counter()
    data = make_dataset(out / "data", classes=preset["classes"], train_per_class=preset["train_per_class"],
                        val_per_class=preset["val_per_class"], seed=args.seed, progress=False)
    root = Path(data["root"])
    tr = split_index(root, "train")
    va = split_index(root, "val")
    test_sizes = sorted(set(preset["test_sizes"]) | set(preset["train_sizes"]))
    augments = ("train",) if args.no_control else ("train", "control")
    results: dict = {"preset": "quick" if args.quick else "full", **{k: list(v) if isinstance(v, tuple) else v
                                                                     for k, v in preset.items()},
                     "test_sizes": test_sizes, "model": MODEL, "n_val": len(va), "n_train": len(tr), "runs": {}}

    for augment in augments:
        for T in preset["train_sizes"]:
            key = f"{augment}@{T}"
            t0 = time.perf_counter()
            torch.manual_seed(args.seed)
            bundle = fixres.load(MODEL, num_classes=tr.num_classes, train_size=T, random_init=True)
            cfg = bundle.data_config
            run_dir = out / key.replace("@", "_")
            tres = train(bundle.model, tr.samples, [], cfg, train_size=T, epochs=preset["epochs"],
                         batch_size=TRAIN_BATCH, lr=TRAIN_LR, out_dir=run_dir / "train", resume=True, repeats=1,
                         augment=augment, schedule="cosine", warmup_epochs=1, seed=args.seed, workers=args.workers,
                         progress=False, model_name=MODEL)
            t_train = time.perf_counter() - t0
            sweep = fixres.sweep(bundle, va, test_sizes, device="cpu", workers=args.workers).to_json()
            entry = {"train_s": t_train, "untuned": {r["test_size"]: [r["top1"], r["top1_std"]] for r in sweep["rows"]},
                     "forward_ms": tres.get("forward_ms"), "backward_ms": tres.get("backward_ms")}
            if augment == "train":
                above = [s for s in test_sizes if s >= T]
                fix_sizes = above if preset["fix_every"] else above[:FIX_ABOVE + 1]
                base_state = {k: v.clone() for k, v in bundle.model.state_dict().items()}
                fixed = {}
                for S in fix_sizes:
                    bundle.model.load_state_dict(base_state)
                    ft = finetune(bundle.model, tr.samples, va.samples, cfg, test_size=S,
                                  epochs=preset["finetune_epochs"], out_dir=run_dir / f"finetune_{S}", resume=True,
                                  workers=args.workers, progress=False, evaluate_before=False, seed=args.seed)
                    fixed[S] = [ft["after"]["top1"], ft["after"]["top1_std"]]
                entry["fixed"] = fixed
            results["runs"][key] = entry
            best = max(entry["untuned"].items(), key=lambda kv: kv[1][0])
            print(f"{key}: trained in {t_train:.0f}s; top-1 at {T}: {entry['untuned'][T][0]:.1f} "
                  f"± {entry['untuned'][T][1]:.1f}; best untuned {best[0]}: {best[1][0]:.1f} ± {best[1][1]:.1f}"
                  + (f"; fixed {', '.join(f'{s}: {v[0]:.1f}' for s, v in entry['fixed'].items())}"
                     if entry.get("fixed") else ""), flush=True)

    results["seconds"] = time.perf_counter() - t_start
    results["summary"] = summarize(results)
    grid = grid_json(results)
    results["grid"] = grid
    json_out = Path(args.json_out) if args.json_out else out / "table5_grid.json"
    write_json(json_out, results)
    print(format_tables(results))
    print(f"\nwritten: {json_out} ({results['seconds'] / 60:.1f} min)")
    if args.report_run:
        run = Path(args.report_run)
        write_json(run / "grid.json", grid)
        import subprocess
        import sys
        # the run's report rebuilt with the heatmaps, by the installed command line (``fixres report RUN_DIR``)
        subprocess.run([sys.executable, "-m", "fixres", "report", str(run)], check=True)
    return 0


def summarize(results: dict) -> list[dict]:
    """Per (augment, T): top-1 at T, the best test size above T and the gain, the fix's best."""
    rows = []
    for key, e in results["runs"].items():
        augment, T = key.split("@")
        T = int(T)
        at_t = e["untuned"][T]
        above = {s: v for s, v in e["untuned"].items() if s > T}
        best_s, best = max(above.items(), key=lambda kv: kv[1][0]) if above else (T, at_t)
        row = {"augment": augment, "train_size": T, "top1_at_T": at_t[0], "std_at_T": at_t[1],
               "best_test_size_above_T": best_s, "top1_best_above_T": best[0], "std_best_above_T": best[1],
               "gain_above_T": best[0] - at_t[0]}
        if e.get("fixed"):
            fs, fv = max(e["fixed"].items(), key=lambda kv: kv[1][0])
            row.update({"fixed_best_test_size": fs, "top1_fixed_best": fv[0], "std_fixed_best": fv[1],
                        "gain_fixed_over_T": fv[0] - at_t[0],
                        "gain_fixed_over_untuned_same_size": fv[0] - e["untuned"][fs][0]})
        rows.append(row)
    return rows


def grid_json(results: dict) -> dict:
    """The report's grid format: rows test sizes, columns train sizes."""
    test_sizes = results["test_sizes"]

    def table(augment: str, which: str):
        ts = [int(k.split("@")[1]) for k in results["runs"] if k.startswith(augment + "@")]
        top1 = [[(results["runs"][f"{augment}@{t}"].get(which) or {}).get(s, [None, None])[0] for t in ts]
                for s in test_sizes]
        std = [[(results["runs"][f"{augment}@{t}"].get(which) or {}).get(s, [None, None])[1] for t in ts]
               for s in test_sizes]
        return ts, top1, std

    ts, top1, std = table("train", "untuned")
    _, fixed, fixed_std = table("train", "fixed")
    grid = {"train_sizes": ts, "test_sizes": test_sizes, "top1": top1, "top1_std": std, "n": results["n_val"],
            "source": (f"benchmarks/table5_grid.py ({results['preset']}): {results['model']} trained "
                       f"{results['epochs']} epochs per train size, fine-tuned {results['finetune_epochs']} epochs, "
                       f"{results['n_val']} validation images")}
    if any(v is not None for row in fixed for v in row):
        grid["top1_fixed"], grid["top1_fixed_std"] = fixed, fixed_std
    if any(k.startswith("control@") for k in results["runs"]):
        cts, ctop1, cstd = table("control", "untuned")
        grid["control"] = {"train_sizes": cts, "test_sizes": test_sizes, "top1": ctop1, "top1_std": cstd}
    return grid


def format_tables(results: dict) -> str:
    lines = []

    def block(title: str, augment: str, which: str):
        keys = [k for k in results["runs"] if k.startswith(augment + "@")]
        if not keys or not any(results["runs"][k].get(which) for k in keys):
            return
        ts = [int(k.split("@")[1]) for k in keys]
        lines.append(f"\n{title}\n" + "test \\ train".ljust(13) + "".join(f"{t:>14}" for t in ts))
        for s in results["test_sizes"]:
            cells = []
            for k in keys:
                v = (results["runs"][k].get(which) or {}).get(s)
                cells.append(f"{v[0]:6.1f} ± {v[1]:4.1f}" if v else " " * 13)
            lines.append(f"{s:<13}" + "".join(f"{c:>14}" for c in cells))

    block("Table 5 (left): RandomResizedCrop, no fine-tuning (top-1 %, ± fold std)", "train", "untuned")
    block("Table 5 (right): after the fix (classifier + bn fine-tuned at the test size, test DA)", "train", "fixed")
    block("Table 9 / appendix D control: resize + fixed-size random crop, no fine-tuning", "control", "untuned")
    lines.append("\nSummary (gain = best top-1 above T minus top-1 at T):")
    for r in results["summary"]:
        line = (f"  {r['augment']:>7} T={r['train_size']}: at T {r['top1_at_T']:.1f} ± {r['std_at_T']:.1f}; "
                f"best above T "
                f"{r['best_test_size_above_T']}: {r['top1_best_above_T']:.1f} ± {r['std_best_above_T']:.1f} "
                f"(gain {r['gain_above_T']:+.1f})")
        if "top1_fixed_best" in r:
            line += (f"; fixed best {r['fixed_best_test_size']}: {r['top1_fixed_best']:.1f} ± {r['std_fixed_best']:.1f}"
                     f" (gain over T {r['gain_fixed_over_T']:+.1f}, over untuned at that size "
                     f"{r['gain_fixed_over_untuned_same_size']:+.1f})")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
