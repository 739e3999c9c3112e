"""``fixres train`` against timm's own ``train.py``: training speed and the accuracy reached, side by side in one run.

Both trainers fine-tune the same network (tf_efficientnet_lite0 from the ImageNet weights of ``--weights
efficientnet-lite0``, with a freshly initialised head for the data's classes) on the same photos at the same
size, batch, epochs, DataLoader workers, threads and precision, as whole processes, one after the other (never
at once; with ``--repeats`` they alternate which goes first):

- fixres: ``python -m fixres train --weights efficientnet-lite0 ...`` with repeated augmentation off, so an
  epoch is one pass over the training photos, as in timm;
- timm: ``python TIMM/train.py`` of a source checkout (``--timm-repo``; run with PYTHONPATH=TIMM so that it uses
  that checkout's timm), its flags set to fixres's recipe: SGD at lr 0.1 x B/256, classical momentum 0.9,
  weight decay 1e-4 on every parameter, a step schedule without warm-up, no label smoothing, RandomResizedCrop
  + flip resampled bicubic, no colour jitter, no EMA, and the same ImageNet weights (saved here in timm's
  layout, given as ``--pretrained --pretrained-path``). Its autocast and channels_last follow the precision
  fixres trains at on this CPU. (The heads differ: each trainer initialises its own for the data's classes.)

Measured: training images/s of each (images trained / seconds of the training loops, as each trainer times
them: fixres's per-epoch log, timm's last "Train:" line of each epoch), the wall seconds of each whole process
(start-up, validation and checkpoints included), and top-1 on the validation photos: each trainer's own report,
and both final models evaluated by the same fixres evaluation at the training size (so the trained weights are
compared, not two evaluation codes), with an exact paired sign test on the photos where they disagree.
Prints a table; writes OUT/train_speed.json (OUT also holds both trainers' folders and logs).

    .venv/bin/python benchmarks/train_speed.py --timm-repo PATH [--data DIR] [--train-size 128] [--epochs 2]
        [--batch-size 32] [--workers W] [--threads 2] [--repeats R] [--out DIR]
    .venv/bin/python benchmarks/train_speed.py --quick --timm-repo PATH    # generated squares: a smoke test

Internal: fixres.method.evaluate - each photo's right/wrong (``keep_outcomes``) for the paired test, which
``fixres.sweep`` (counts only) does not return.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    REPO,
    SHARED,
    binomial_se,
    default_workers,
    paired_test,
    precision_for,
    small_split,
    split_index,
    write_json,
)

WEIGHTS = "efficientnet-lite0"
ARCH = "tf_efficientnet_lite0"  # the architecture the registry weights are for (fixres.models.loading)
SEED = 0
#: Generated data, one short epoch: both trainers run end to end in a few minutes on one core.
QUICK = {"train_size": 64, "epochs": 1, "batch_size": 8}
FULL = {"train_size": 128, "epochs": 2, "batch_size": 32}
#: timm logs a step when its index is a multiple of this, and the last step of every epoch: only those two.
LOG_INTERVAL = 1_000_000
#: timm's per-step line: "Train: E [ i/n (p%)] Loss: ... Time: 1.2s, 26/s (1.3s, 25/s) LR: ..."; the bracketed
#: pair is the epoch's running average (seconds per step, images/s).
TIMM_TRAIN_LINE = re.compile(r"Train:\s*(\d+)\s*\[\s*(\d+)/(\d+).*?Time:.*?\(\s*([\d.]+)s,\s*([\d.]+)/s\s*\)")


class InputError(Exception):
    """Bad input: said in one line, exit status 2."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="generated coloured squares (3 classes), train size 64, 1 epoch, batch 8: a smoke test")
    ap.add_argument("--timm-repo", default=None, metavar="PATH", help="a timm source checkout (its train.py)")
    ap.add_argument("--data", default=str(SHARED / "flowers17"), help="folder with train/ and val/ ImageFolders")
    ap.add_argument("--train-size", type=_positive, default=None, help="training size, pixels (default 128)")
    ap.add_argument("--epochs", type=_positive, default=None, help="(default 2)")
    ap.add_argument("--batch-size", type=_positive, default=None, help="(default 32)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers, both trainers (default: fixres's)")
    ap.add_argument("--threads", type=_positive, default=2, help="OMP_NUM_THREADS of both trainers (default 2)")
    ap.add_argument("--repeats", type=_positive, default=1, help="runs of each trainer, alternating the order")
    ap.add_argument("--fp32", action="store_true", help="both in fp32, contiguous (default: fixres's precision)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="folder for the trainers' runs and train_speed.json (default runs/train_speed[_quick])")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be 0 or more, got {args.workers}")
    return args


def check_inputs(args, out: Path) -> tuple[Path, Path]:
    """(timm checkout, data root), or InputError naming what is missing."""
    if not args.timm_repo:
        raise InputError("--timm-repo PATH is required: a timm source checkout whose train.py is run")
    timm_repo = Path(args.timm_repo).expanduser().resolve()
    if not (timm_repo / "train.py").is_file() or not (timm_repo / "timm").is_dir():
        raise InputError(f"--timm-repo {args.timm_repo}: not a timm source checkout (no train.py and timm/ there)")
    data = small_split(out, val_per_class=8) if args.quick else Path(args.data).expanduser()
    if not data.is_dir():
        raise InputError(f"data folder not found: {data}")
    missing = [s for s in ("train", "val") if not (data / s).is_dir()]
    if missing:
        raise InputError(f"{data} has no {' and no '.join(s + '/' for s in missing)} folder: both trainers need "
                         "train/ and val/ ImageFolders")
    return timm_repo, data.resolve()


def natural_key(name: str) -> list:
    """timm's folder reader orders classes by this key (timm.utils.misc.natural_key)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def imagenet_weights_file(out: Path) -> Path:
    """The registry's ImageNet weights in timm's layout (what fixres loads for --weights), for timm's
    --pretrained-path: both trainers start from the same numbers."""
    from safetensors.torch import save_file

    import fixres
    path = out / "weights" / f"{ARCH}_imagenet.safetensors"
    if not path.is_file():
        try:
            model = fixres.load(WEIGHTS).model
        except Exception as exc:  # noqa: BLE001 - the registry weights package is not installed
            raise InputError(f"cannot load --weights {WEIGHTS}: {exc}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


# --------------------------------------------------------------------------- the two command lines

def fixres_command(args, data: Path, folder: Path, lr: float) -> list[str]:
    cmd = [sys.executable, "-m", "fixres", "train", "--weights", WEIGHTS, "--data", str(data),
           "--train-size", str(args.train_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--device", "cpu", "--repeats", "1", "--val-sizes", str(args.train_size),
           "--lr", f"{lr:g}", "--seed", str(SEED), "--out", str(folder), "--json"]
    return cmd + (["--no-amp"] if args.fp32 else [])


def timm_command(args, data: Path, folder: Path, lr: float, *, timm_repo: Path, weights: Path, num_classes: int,
                 precision) -> list[str]:
    cmd = [sys.executable, str(timm_repo / "train.py"), "--data-dir", str(data), "--train-split", "train",
           "--val-split", "val", "--model", ARCH, "--pretrained", "--pretrained-path", str(weights),
           "--num-classes", str(num_classes), "--img-size", str(args.train_size),
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.workers),
           "--device", "cpu",
           # fixres's recipe (fixres.method.trainrecipe): torch's SGD with classical momentum (timm's "sgd" is
           # Nesterov's) and weight decay on every parameter (timm leaves biases and norms out by default),
           # lr 0.1 x B/256, /10 every 30 epochs, no warm-up
           "--opt", "momentum", "--opt-kwargs", "filter_bias_and_bn=False", "--lr", f"{lr:g}", "--momentum", "0.9",
           "--weight-decay", "1e-4", "--sched", "step",
           "--decay-epochs", "30", "--decay-rate", "0.1", "--warmup-epochs", "0", "--smoothing", "0",
           # fixres's train augmentation: RandomResizedCrop (0.08-1) + flip, the model's bicubic, no jitter
           "--scale", "0.08", "1", "--hflip", "0.5", "--color-jitter", "0", "--train-interpolation", "bicubic",
           "--reprob", "0", "--seed", str(SEED), "--log-interval", str(LOG_INTERVAL), "--checkpoint-hist", "1",
           "--output", str(folder), "--experiment", "train"]
    if precision.channels_last:
        cmd.append("--channels-last")
    if precision.amp:
        cmd += ["--amp", "--amp-dtype", str(precision.dtype).removeprefix("torch.")]  # bfloat16 on a CPU
    return cmd


# --------------------------------------------------------------------------- running and reading them

def run_process(cmd: list[str], *, env: dict, cwd: Path, stdout: Path, stderr: Path) -> tuple[int, float]:
    """(exit status, wall seconds) of one whole trainer process, its output in files."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(stdout, "w", encoding="utf-8") as out, open(stderr, "w", encoding="utf-8") as err:
        t = time.perf_counter()
        rc = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
        return rc, time.perf_counter() - t


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line[:200] for line in text.splitlines()[-lines:])


def _rate(epochs: list[dict]) -> tuple[int, float]:
    """(images, seconds) of the training loops over all epochs."""
    return sum(e["images"] for e in epochs), sum(e["seconds"] for e in epochs)


def read_fixres(stdout: Path, folder: Path) -> dict:
    """Per-epoch training images and seconds and the last validation, from ``--json`` (else log.jsonl)."""
    text = stdout.read_text(encoding="utf-8", errors="replace")
    doc = None
    if "{" in text:
        try:
            doc = json.loads(text[text.index("{"):])
        except json.JSONDecodeError:
            doc = None
    if doc is not None:
        rows = doc.get("epochs") or []
    else:
        log = folder / "log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    epochs = [{"epoch": r["epoch"], "images": int(r["images"]), "seconds": float(r["seconds"])} for r in rows
              if r.get("images") and r.get("seconds")]
    if not epochs:
        raise ValueError("no epoch with images and seconds in fixres's output")
    return {"epochs": epochs, "own_val_top1": rows[-1].get("val_top1_train_size"),
            "precision": (doc or {}).get("hparams", {}).get("precision"),
            "model_dir": str(Path(doc["model_path"]).parent) if doc and doc.get("model_path") else str(folder)}


def check_timm_start(log_text: str) -> None:
    """timm loads the given weights non-strictly once it drops their 1000-class head, saying only in its log
    which keys it missed: refuse the run unless the file was read and nothing but the head was left out."""
    if "Loading pretrained weights from file" not in log_text:
        raise ValueError("timm did not say it loaded the ImageNet weights file")
    missing = re.search(r"Missing keys \((.*?)\) discovered", log_text)
    keys = [k.strip() for k in missing[1].split(",")] if missing else []
    backbone = [k for k in keys if not k.startswith("classifier.")]
    if backbone or "Unexpected keys (" in log_text:
        raise ValueError(f"timm did not load all the ImageNet weights (missing {', '.join(backbone[:4]) or '-'}; "
                         "see its log)")


def read_timm(log: Path, folder: Path, batch_size: int) -> dict:
    """Per-epoch images and seconds from the last "Train:" line of each epoch (the epoch's average seconds per
    step and images/s, every step a full batch: timm drops the last partial one), top-1 from summary.csv."""
    text = log.read_text(encoding="utf-8", errors="replace")
    check_timm_start(text)
    last: dict[int, tuple] = {}
    for line in text.splitlines():
        m = TIMM_TRAIN_LINE.search(line)
        if m:
            epoch, idx, steps, avg_s, rate = int(m[1]), int(m[2]), int(m[3]), float(m[4]), float(m[5])
            last[epoch] = (idx, steps, avg_s, rate)
    epochs = []
    for epoch, (idx, steps, avg_s, rate) in sorted(last.items()):
        if idx + 1 != steps:
            raise ValueError(f"timm's epoch {epoch} ended at step {idx + 1} of {steps}")
        images = steps * batch_size
        epochs.append({"epoch": epoch + 1, "images": images,
                       "seconds": images / rate if rate > 0 else steps * avg_s})
    if not epochs:
        raise ValueError(f"no 'Train:' lines in {log}")
    summary = folder / "train" / "summary.csv"
    top1 = None
    if summary.is_file():
        with open(summary, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and rows[-1].get("eval_top1"):
            top1 = float(rows[-1]["eval_top1"])
    checkpoint = folder / "train" / "last.pth.tar"
    if not checkpoint.is_file():
        raise ValueError(f"timm wrote no {checkpoint}")
    return {"epochs": epochs, "own_val_top1": top1, "checkpoint": str(checkpoint)}


def run_trainer(tool: str, cmd: list[str], *, env: dict, run_dir: Path, read) -> dict:
    """One whole trainer process; its record (wall and loop timings, own top-1), or a record with ``error``."""
    stdout, stderr = run_dir / f"{tool}.stdout", run_dir / f"{tool}.log"
    rc, wall = run_process(cmd, env=env, cwd=run_dir, stdout=stdout, stderr=stderr)
    record = {"tool": tool, "returncode": rc, "wall_s": wall, "log": str(stderr)}
    if rc != 0:
        record["error"] = f"{tool} exited with status {rc}"
        return record
    try:
        record.update(read(stdout, stderr))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        record["error"] = f"could not read {tool}'s output: {exc}"
        return record
    record["images"], record["loop_s"] = _rate(record["epochs"])
    record["images_per_s"] = record["images"] / record["loop_s"]
    record["images_per_wall_s"] = record["images"] / wall  # start-up, validation and checkpoints included
    return record


# --------------------------------------------------------------------------- the same evaluation of both

def evaluate_both(fixres_dir: str, timm_checkpoint: str, val, classes: list[str], *, size: int, batch_size: int,
                  workers: int) -> dict:
    """Both final models on the same validation photos by fixres's evaluation at ``size`` (the fixres export's
    pre-processing for both): top-1 of each and each photo's right/wrong, paired."""
    import timm

    import fixres
    from fixres.method.evaluate import evaluate

    bundle = fixres.load(fixres_dir)
    cfg = bundle.data_config
    net = timm.create_model(ARCH, num_classes=len(classes))
    timm.models.load_checkpoint(net, timm_checkpoint, use_ema=False, strict=True)
    # timm numbered the classes in its own folder order: give its model the labels in that order
    timm_index = {name: i for i, name in enumerate(sorted(classes, key=natural_key))}
    samples = {"fixres": list(val.samples),
               "timm": [(path, timm_index[classes[label]]) for path, label in val.samples]}
    found, hits = {}, {}
    for tool, model in (("fixres", bundle.model), ("timm", net)):
        res = evaluate(model, samples[tool], cfg, test_sizes=[size], batch_size=batch_size, workers=workers,
                       progress=False, keep_outcomes=True, num_classes=len(classes), per_class=False)
        row = res.rows[0]
        hits[tool] = dict(zip(res.arrays.idx.tolist(), res.hits_at(row).tolist()))
        found[tool] = {"top1": row.top1, "n": row.n, "se": binomial_se(row.top1, row.n), "precision": res.precision}
    common = sorted(set(hits["fixres"]) & set(hits["timm"]))
    test = paired_test([hits["fixres"][i] for i in common], [hits["timm"][i] for i in common])
    return {"size": size, "crop_ratio": cfg.crop_ratio, "interpolation": cfg.interpolation, "models": found,
            "paired": {"n": len(common), "only_fixres_right": test["only_a"], "only_timm_right": test["only_b"],
                       "sign_test_p": test["p"]}}


# --------------------------------------------------------------------------- report

def summarise(runs: list[dict]) -> dict:
    by_tool = {t: [r for r in runs if r["tool"] == t] for t in ("fixres", "timm")}
    summary = {t: {"images_per_s_median": statistics.median(r["images_per_s"] for r in rs),
                   "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                   "own_val_top1": rs[0].get("own_val_top1")} for t, rs in by_tool.items()}
    ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(by_tool["fixres"], by_tool["timm"])]
    walls = [a["wall_s"] / b["wall_s"] for a, b in zip(by_tool["fixres"], by_tool["timm"])]
    summary["ratio_images_per_s"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    summary["ratio_wall_s"] = {"median": statistics.median(walls), "min": min(walls), "max": max(walls)}
    return summary


def print_table(summary: dict, evaluation: dict | None, repeats: int) -> None:
    def pct(v):
        return "-" if v is None else f"{v:.1f}"
    print(f"{'tool':8s} {'images/s':>9s} {'wall s':>8s} {'val top-1 (same eval)':>22s} {'own report':>11s}")
    for tool in ("fixres", "timm"):
        s = summary[tool]
        same = "-"
        if evaluation:
            m = evaluation["models"][tool]
            same = f"{m['top1']:.1f} ± {m['se']:.1f}"
        print(f"{tool:8s} {s['images_per_s_median']:9.1f} {s['wall_s_median']:8.1f} {same:>22s} "
              f"{pct(s['own_val_top1']):>11s}")
    r, w = summary["ratio_images_per_s"], summary["ratio_wall_s"]
    spread = f" (spread {r['min']:.2f}-{r['max']:.2f} over {repeats} repeats)" if repeats > 1 else ""
    print(f"fixres / timm training images/s: {r['median']:.2f}{spread}; wall time ratio {w['median']:.2f}")
    if evaluation:
        p = evaluation["paired"]
        print(f"paired on {p['n']} val photos at {evaluation['size']}px: only fixres right on "
              f"{p['only_fixres_right']}, only timm right on {p['only_timm_right']}, "
              f"exact sign test p = {p['sign_test_p']:.3g}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or REPO / "runs" / f"train_speed{'_quick' if args.quick else ''}").resolve()
    try:
        timm_repo, data = check_inputs(args, out)
        train = split_index(data, "train")
        val = split_index(data, "val", classes=train.classes)
        if not train.samples or not val.samples:
            raise InputError(f"{data}: no photos in {'train/' if not train.samples else 'val/'}")
        weights = imagenet_weights_file(out)
    except InputError as exc:
        print(f"train_speed: {exc}", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)  # the evaluation here runs on the trainers' thread count
    args.workers = default_workers() if args.workers is None else args.workers
    precision = precision_for(torch.device("cpu"), amp=not args.fp32)
    lr = 0.1 * args.batch_size / 256  # fixres's default (the paper's), given to both
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1"}
    timm_env = {**env, "PYTHONPATH": os.pathsep.join([str(timm_repo)] + ([env["PYTHONPATH"]]
                                                                          if env.get("PYTHONPATH") else []))}
    classes = list(train.classes)
    load_avg_start = os.getloadavg()
    print(f"{ARCH} from {WEIGHTS} on {data}: {len(train.samples)} train / {len(val.samples)} val photos of "
          f"{len(classes)} classes at {args.train_size}px, batch {args.batch_size}, {args.epochs} epoch(s), "
          f"{args.workers} workers, {args.threads} threads, {precision.describe()}, load avg {load_avg_start[0]:.1f}",
          flush=True)
    result = {"model": ARCH, "weights": WEIGHTS, "data": str(data), "n_train": len(train.samples),
              "n_val": len(val.samples), "num_classes": len(classes), "train_size": args.train_size,
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr, "workers": args.workers,
              "threads": args.threads, "precision": precision.describe(), "repeats": args.repeats,
              "timm_repo": str(timm_repo), "cpu_count": os.cpu_count(), "load_avg_start": load_avg_start,
              "command": "benchmarks/train_speed.py" + (" --quick" if args.quick else ""), "runs": []}
    for r in range(args.repeats):
        run_dir = out / f"run{r + 1}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # this benchmark's own folder: every trainer starts afresh
        commands = {"fixres": fixres_command(args, data, run_dir / "fixres", lr),
                    "timm": timm_command(args, data, run_dir / "timm", lr, timm_repo=timm_repo, weights=weights,
                                         num_classes=len(classes), precision=precision)}
        if r == 0:
            result["commands"] = {t: c[1:] for t, c in commands.items()}
        for position, tool in enumerate(("fixres", "timm") if r % 2 == 0 else ("timm", "fixres")):
            if tool == "fixres":
                rec = run_trainer("fixres", commands["fixres"], env=env, run_dir=run_dir,
                                  read=lambda so, _log, d=run_dir: read_fixres(so, d / "fixres"))
            else:
                rec = run_trainer("timm", commands["timm"], env=timm_env, run_dir=run_dir,
                                  read=lambda _so, log, d=run_dir: read_timm(log, d / "timm", args.batch_size))
            rec.update({"repeat": r + 1, "position": position + 1})
            result["runs"].append(rec)
            if "error" in rec:
                print(f"train_speed: {rec['error']}; the end of {rec['log']}:\n{_tail(Path(rec['log']))}",
                      file=sys.stderr)
                write_json(out / "train_speed.json", result)
                return 1
            print(f"repeat {r + 1}: {tool:6s} {rec['images_per_s']:.1f} images/s over {rec['images']} images, "
                  f"wall {rec['wall_s']:.1f} s", flush=True)
    result["summary"] = summarise(result["runs"])
    first = {rec["tool"]: rec for rec in result["runs"] if rec["repeat"] == 1}
    try:
        result["evaluation"] = evaluate_both(first["fixres"]["model_dir"], first["timm"]["checkpoint"], val, classes,
                                             size=args.train_size, batch_size=args.batch_size, workers=args.workers)
    except Exception as exc:  # noqa: BLE001 - the speeds stand; say why the paired comparison is missing
        result["evaluation"] = None
        result["evaluation_error"] = f"{type(exc).__name__}: {exc}"
        print(f"train_speed: the common evaluation failed: {result['evaluation_error']}", file=sys.stderr)
    print_table(result["summary"], result["evaluation"], args.repeats)
    result["load_avg_end"] = os.getloadavg()
    write_json(out / "train_speed.json", result)
    print(f"wrote {out / 'train_speed.json'} (load avg at the end {result['load_avg_end'][0]:.1f})")
    return 0 if result["evaluation"] else 1


if __name__ == "__main__":
    sys.exit(main())
