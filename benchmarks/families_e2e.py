"""FixRes end to end on a vision transformer and a ConvNeXt.

On the embedded data set (``fixres make-dataset``: the paper's imaging model, 10 classes, 1500 training and
500 validation photos), two small built-in timm models are trained from scratch at 64 px with ``fixres train``
and fixed with ``fixres fix`` (default parts ``classifier,norm``: the classifier and the LayerNorm nearest the
pooled vector, fine-tuned at the test size ``fix`` chooses on held-out training images):

* ``fixres_tiny_vit``: ViT, patch 8, width 64, depth 4, 4 heads, class token (any input size);
* ``fixres_tiny_convnext``: ConvNeXt, depths 1-1-2-1, widths 16-128 (LayerNorm, no batch-norm).

One recipe for both, not tuned on the validation images: AdamW (``fixres train --optimizer adamw``: how ViTs
and ConvNeXts are trained), lr 1e-3 for a batch of 64, 2 warm-up epochs then half-cosine, weight decay 0.05,
label smoothing 0.1, no repeated augmentation, RandomResizedCrop + flip at 64 px, fp32 (``--no-amp``: CPU bf16
autocast is slower here). Each model is trained and fixed in its own processes, exactly as a user would type it; the
two models run side by side (``--serial``: one after the other).

Reported per model (from ``fix``'s headline): top-1 at 64 px, at the best untuned test size, and after the fix
at the size ``fix`` chose, each with the std over validation folds (``fold_std``, as the report shows it) and
the binomial standard error sqrt(p (1 - p) / n) of a top-1 p on n images; wall seconds of train and fix.

    python benchmarks/families_e2e.py --quick            # 3 classes, tiny data, 2 epochs: a smoke run
    nice -n 10 python benchmarks/families_e2e.py         # the README numbers (about 25 minutes on 2 shared cores)

Results: benchmarks/results/families_e2e.json (``--quick``: families_e2e_quick.json). Rerunning continues
where a killed run stopped: ``train --resume`` and ``fix`` resume from their folders under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import REPO, write_json

RESULTS = REPO / "benchmarks" / "results"
MODELS = ("fixres_tiny_vit", "fixres_tiny_convnext")
TRAIN_SIZE = 64
BATCH = 64
OPTIMIZER = "adamw"
LR = 1e-3
WARMUP_EPOCHS = 2
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
#: Full run: epochs of one pass over the 1500 training photos, as many as the demo's CNN trains.
EPOCHS = 30
QUICK = dict(epochs=2, fix_epochs=1, classes=3, train_per_class=20, val_per_class=10, warmup=0)


def _fixres(*args, log: Path) -> tuple[dict, float]:
    """Run ``fixres ARGS --json`` in a child process; (its JSON result, wall seconds). Progress goes to ``log``."""
    cmd = [sys.executable, "-m", "fixres", *map(str, args), "--json"]
    t0 = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)  # the installed fixres
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout), wall


def binomial_se(top1: float | None, n: int | None) -> float | None:
    """Standard error (points) of a top-1 (percent) measured on n images."""
    if top1 is None or not n:
        return None
    p = top1 / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def _entry(head: dict, key: str, size_key: str | None) -> dict:
    top1, n = head.get(key), head.get("n_val")
    return {"test_size": head.get(size_key) if size_key else TRAIN_SIZE, "top1": top1,
            "fold_std": head.get(f"{key}_std"), "binomial_se": binomial_se(top1, n)}


def run_model(model: str, data: Path, work: Path, *, epochs: int, warmup: float, fix_epochs: int | None) -> dict:
    log = work / f"{model}.log"
    train_dir = work / f"train_{model}"
    train_args = ["train", "--model", model, "--data", data, "--train-size", TRAIN_SIZE, "--epochs", epochs,
                  "--batch-size", BATCH, "--optimizer", OPTIMIZER, "--lr", LR, "--schedule", "cosine",
                  "--warmup-epochs", warmup,
                  "--weight-decay", WEIGHT_DECAY, "--label-smoothing", LABEL_SMOOTHING, "--repeats", 1,
                  "--val-sizes", TRAIN_SIZE, "--no-amp", "--out", train_dir, "-q"]
    if (train_dir / "train_state.pt").is_file():
        train_args.append("--resume")
    trained, train_s = _fixres(*train_args, log=log)
    fix_args = ["fix", "--checkpoint", train_dir / "model.safetensors", "--data", data, "--train-size", TRAIN_SIZE,
                "--no-amp", "--out", work / f"fix_{model}", "-q"]
    if fix_epochs is not None:
        fix_args += ["--epochs", fix_epochs]
    fixed, fix_s = _fixres(*fix_args, log=log)
    head = fixed["headline"]
    return {
        "model": model, "n_val": head.get("n_val"), "train_epochs": epochs,
        "train_final": trained.get("final"),
        "at_train_size": _entry(head, "top1_at_train_size", None),
        "best_untuned": _entry(head, "top1_best_untuned", "best_untuned_test_size"),
        "untuned_at_fixed_size": _entry(head, "top1_untuned_at_test_size", "test_size"),
        "fixed": _entry(head, "top1_fixed", "test_size"),
        "recommended_test_size": head.get("recommended_test_size"),
        "wall_s": {"train": round(train_s, 1), "fix": round(fix_s, 1)},
        "fix_timings": head.get("timings"), "run_dir": fixed.get("run_dir"),
    }


def _line(r: dict) -> str:
    def cell(e):
        if e["top1"] is None:
            return "-"
        return f"{e['top1']:.1f} (fold std {e['fold_std'] or 0:.1f}, SE {e['binomial_se']:.1f}) @{e['test_size']}"
    return (f"{r['model']:<22} at {TRAIN_SIZE}: {cell(r['at_train_size'])} | best untuned: {cell(r['best_untuned'])}"
            f" | fixed: {cell(r['fixed'])} | train {r['wall_s']['train']:.0f}s, fix {r['wall_s']['fix']:.0f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny data, 2 epochs (a smoke run, numbers meaningless)")
    ap.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {EPOCHS})")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "families_e2e", help="data and run folders")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--serial", action="store_true", help="one model after the other (default: side by side)")
    args = ap.parse_args(argv)
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    size_args = (["--classes", QUICK["classes"], "--train-per-class", QUICK["train_per_class"],
                  "--val-per-class", QUICK["val_per_class"]] if args.quick else [])
    if not (data / "train").is_dir():
        _fixres("make-dataset", "--out", data, "-q", *size_args, log=work / "data.log")
    epochs = args.epochs or (QUICK["epochs"] if args.quick else EPOCHS)
    warmup = QUICK["warmup"] if args.quick else WARMUP_EPOCHS
    out = args.out or RESULTS / ("families_e2e_quick.json" if args.quick else "families_e2e.json")
    result = {"data": str(data), "quick": args.quick, "train_size": TRAIN_SIZE,
              "recipe": {"optimizer": OPTIMIZER, "lr": LR, "batch_size": BATCH, "epochs": epochs,
                         "warmup_epochs": warmup, "schedule": "cosine", "weight_decay": WEIGHT_DECAY,
                         "label_smoothing": LABEL_SMOOTHING, "repeats": 1, "precision": "fp32"},
              "fix": "fixres fix --checkpoint TRAIN/model.safetensors --data DATA --train-size 64 (defaults)",
              "noise": "fold_std: std of top-1 over validation folds; binomial_se: sqrt(p(1-p)/n)",
              "models": []}
    models = args.models.split(",")
    with ThreadPoolExecutor(max_workers=1 if args.serial else len(models)) as pool:
        runs = [pool.submit(run_model, m, data, work, epochs=epochs, warmup=warmup,
                            fix_epochs=QUICK["fix_epochs"] if args.quick else None) for m in models]
        for run in runs:
            row = run.result()
            result["models"].append(row)
            write_json(out, result)
            print(_line(row), flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
