"""Train low + fix vs train at S on real photos: the paper's cost claim (section 5.3, table 7), end to end.

EfficientNet-Lite0 (registry ImageNet weights, a new head) is trained by transfer on a real photo set
twice, with the same epochs, recipe and seed: once at T = 128 and once at S. The 128 model is then fixed
with ``fixres fix`` (the default job on that checkpoint; S is the size ``fix`` chose, or --test-size).
Every step runs the installed command line in a subprocess, as a user would, and is timed (wall):

  1. fixres train --weights efficientnet-lite0 --train-size 128 ...      -> OUT/train128
  2. fixres fix --checkpoint OUT/train128/model.safetensors ...           -> OUT/fix128 (S from its run.json)
  3. fixres train --weights efficientnet-lite0 --train-size S ...        -> OUT/trainS

On the same validation images (val mapped onto the training classes by name) it then evaluates the 128
model at 128 and at S (no fix), the fixed export at S and the S model at S, and reports for each: top-1,
its binomial standard error, the exact paired McNemar p against "trained at S", the wall seconds of
training, of fixing, in total, and the cost ratio total / (training at S). Results: a markdown table and
one sentence on stdout, OUT/train_low_fix.json (written atomically), per-step times in OUT/timings.json.

Usage:
  python benchmarks/train_low_fix.py --quick                 # tiny CNN, generated images, T=32, S=48: ~2 min
  python benchmarks/train_low_fix.py                         # cats_vs_dogs (600 train / 800 val), 5 epochs
  python benchmarks/train_low_fix.py --data flowers17 --epochs 5 --out runs/train_low_fix_flowers
  python benchmarks/train_low_fix.py --resume                # continue a killed run: done steps are skipped
Without registry weights or the shared photos (../shared/data, FIXRES_SHARED_DATA) it says so and measures nothing.

Internal: fixres.method.evaluate - the paired test needs every photo's outcome (``keep_outcomes``: right or
not, per image index) from the one-pass evaluation fixres eval runs; ``fixres.sweep`` returns each size's
totals only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import binomial_se, paired_test, photos_and_weights, shared_folder, small_split, split_index, write_json

DEFAULT_DATA = "cats_vs_dogs"
DEFAULT_OUT = "runs/train_low_fix"
WEIGHTS = "efficientnet-lite0"
TRAIN_SIZE = 128
DEFAULT_EPOCHS = 5
BATCH_SIZE = 32
SEED = 0
#: paired McNemar p at or above this: the two models are equally accurate within noise
NOISE_P = 0.05
PERCENT = 100.0

QUICK_MODEL = "fixres_tiny_resnet"
QUICK_TRAIN_SIZE = 32
QUICK_TEST_SIZE = 48
QUICK_EPOCHS = 2
QUICK_VAL_PER_CLASS = 16
QUICK_WORKERS = 0
#: from-scratch rate for the tiny CNN (both --quick trainings; the default 0.1 x B/256 barely moves it in 2 epochs)
QUICK_LR = 0.1
#: fix in --quick: one fine-tuning epoch at the paper's rate, a two-size sweep
QUICK_FIX_FLAGS = ("--epochs", "1", "--no-tune-schedule")

CHECKPOINT = "model.safetensors"  # what `fixres train` writes in its --out (with fixres.json beside it)
FIX_RUN = "run.json"              # what `fixres fix` writes last in its --out, with the chosen "test_size"
EXPORT = "export"
TIMINGS = "timings.json"
RESULT = "train_low_fix.json"


def _resolve_data(args) -> Path | None:
    """The photo folder (or the generated one in --quick); None after saying why there is nothing to measure."""
    out = Path(args.out)
    if args.quick:
        return small_split(out, val_per_class=QUICK_VAL_PER_CLASS)
    root = Path(args.data) if Path(args.data).is_dir() else shared_folder(args.data)
    if root is None:
        return None
    found = photos_and_weights(root, WEIGHTS)  # loads the registry weights once: are they installed?
    return None if found is None else found[1]


def _classes(root: Path) -> list[str]:
    return list(split_index(root, "train").classes)


class Steps:
    """The three command-line steps, each timed into OUT/timings.json; with --resume a finished step is skipped
    and an interrupted one continued (its time then counts only the part run since)."""

    def __init__(self, args, root: Path, num_classes: int):
        self.args, self.root, self.k = args, root, num_classes
        self.out = Path(args.out)
        self.timings_path = self.out / TIMINGS
        self.timings = json.loads(self.timings_path.read_text()) if args.resume and self.timings_path.is_file() else {}

    def _run(self, name: str, cli_args: list[str], *, done: bool, resumed: bool) -> float | None:
        cmd = [sys.executable, "-m", "fixres", *cli_args]
        if done:
            print(f"[{name}] done before, skipped (--resume): {self.out / name}", file=sys.stderr)
            return (self.timings.get(name) or {}).get("wall_s")
        print(f"[{name}] {shlex.join(['fixres', *cli_args])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{name} failed (exit {proc.returncode}): {shlex.join(cmd)}")
        self.timings[name] = {"wall_s": wall, "command": shlex.join(["fixres", *cli_args]), "resumed": resumed}
        write_json(self.timings_path, self.timings)
        return wall

    def _runtime_flags(self) -> list[str]:
        workers = QUICK_WORKERS if self.args.quick and self.args.workers is None else self.args.workers
        return [] if workers is None else ["--workers", str(workers)]

    def train(self, size: int) -> tuple[Path, float | None]:
        name = f"train{size}"
        folder = self.out / name
        source = ["--model", QUICK_MODEL] if self.args.quick else ["--weights", WEIGHTS]
        partial = self.args.resume and (folder / "train_state.pt").is_file()
        cli = ["train", *source, "--num-classes", str(self.k), "--data", str(self.root), "--train-size", str(size),
               "--epochs", str(self.args.epochs), "--batch-size", str(BATCH_SIZE), "--val-sizes", str(size),
               "--seed", str(SEED), "--out", str(folder), *self._runtime_flags(), *(["--resume"] if partial else []),
               *(["--lr", str(QUICK_LR)] if self.args.quick else [])]
        done = self.args.resume and (folder / CHECKPOINT).is_file()
        return folder / CHECKPOINT, self._run(name, cli, done=done, resumed=bool(partial))

    def fix(self, checkpoint: Path, train_size: int) -> tuple[int, Path, float | None]:
        name = f"fix{train_size}"
        folder = self.out / name
        cli = ["fix", "--checkpoint", str(checkpoint), "--data", str(self.root), "--train-size", str(train_size),
               "--seed", str(SEED), "--out", str(folder), "-q", *self._runtime_flags()]
        if self.args.test_size:
            cli += ["--test-size", str(self.args.test_size)]
        if self.args.quick:
            cli += [*QUICK_FIX_FLAGS, "--test-sizes", f"{train_size},{self.args.test_size}"]
        done = self.args.resume and (folder / FIX_RUN).is_file() and (folder / EXPORT / CHECKPOINT).is_file()
        partial = self.args.resume and folder.is_dir() and not done  # `fixres fix` resumes its own run folder
        wall = self._run(name, cli, done=done, resumed=partial)
        chosen = int(json.loads((folder / FIX_RUN).read_text())["test_size"])
        return chosen, folder / EXPORT / CHECKPOINT, wall


def _outcomes(checkpoint: Path, samples, sizes: list[int], workers) -> tuple[dict, str]:
    """{size: {image index: right?}} of one checkpoint on ``samples`` (one pass), and the precision used."""
    import fixres
    from fixres.method.evaluate import evaluate
    bundle = fixres.load(checkpoint)
    cfg = bundle.data_config
    ev = evaluate(bundle.model, samples, cfg, test_sizes=sizes, crop_ratios=[cfg.crop_ratio], keep_outcomes=True,
                  per_class=False, progress=False, workers=workers)
    idx = [int(i) for i in ev.arrays.idx]
    per_size = {s: dict(zip(idx, (bool(b) for b in ev.hits_at(ev.at(s))))) for s in sizes}
    return per_size, ev.precision


def _evaluate_all(root: Path, t: int, s: int, paths: dict, workers) -> tuple[dict, int, str]:
    """Per-image outcomes of the four rows on the same validation images (those every evaluation read)."""
    train_index = split_index(root, "train")
    val = split_index(root, "val", classes=train_index.classes)  # the one class-set rule, as `fixres fix`
    low, precision = _outcomes(paths["train_t"], val.samples, sorted({t, s}), workers)
    fixed, _ = _outcomes(paths["fixed"], val.samples, [s], workers)
    high, _ = _outcomes(paths["train_s"], val.samples, [s], workers)
    rows = {"T@T": low[t], "T@S": low[s], "T+fix@S": fixed[s], "S@S": high[s]}
    common = sorted(set.intersection(*(set(r) for r in rows.values())))
    return {k: [r[i] for i in common] for k, r in rows.items()}, len(common), precision


def _rows(outcomes: dict, n: int, t: int, s: int, wall: dict) -> list[dict]:
    labels = {"T@T": f"trained at {t}, tested at {t}", "T@S": f"trained at {t}, tested at {s} (no fix)",
              "T+fix@S": f"trained at {t} + fixed at {s}", "S@S": f"trained at {s}, tested at {s}"}
    reference = outcomes["S@S"]
    rows = []
    for key, label in labels.items():
        right = outcomes[key]
        top1 = PERCENT * sum(right) / n if n else float("nan")
        test = None if key == "S@S" else paired_test(right, reference)
        train_s = wall["train_s"] if key == "S@S" else wall["train_t"]
        fix_s = wall["fix"] if key == "T+fix@S" else None
        total = None if train_s is None or (key == "T+fix@S" and fix_s is None) else train_s + (fix_s or 0.0)
        ratio = total / wall["train_s"] if total is not None and wall["train_s"] else None
        rows.append({"key": key, "label": label, "top1": top1, "se": binomial_se(top1, n), "n": n,
                     "p_vs_S": None if test is None else test["p"],
                     "only_this": None if test is None else test["only_a"],
                     "only_S": None if test is None else test["only_b"],
                     "train_s": train_s, "fix_s": fix_s, "total_s": total, "cost_ratio": ratio})
    return rows


def _machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now().isoformat(timespec="seconds")}


def _fmt(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(r: dict) -> str:
    m = r["machine"]
    head = (f"{r['model']} on {r['data_name']} ({r['n_train']} train / {r['n_val']} val images, {r['classes']} "
            f"classes), {r['epochs']} epoch(s) each, batch {r['batch_size']}, seed {r['seed']}; S = {r['test_size']} "
            f"({r['test_size_from']}); evaluated at {r['precision']} on {r['n']} images")
    lines = [head, "",
             "| model | val top-1 % | ± SE | paired p vs trained at S "
             "| train s | fix s | total s | cost / train at S |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        p = "(reference)" if row["p_vs_S"] is None else \
            f"{row['p_vs_S']:.3g} ({row['only_this']} vs {row['only_S']})"
        lines.append(f"| {row['label']} | {row['top1']:.1f} | {row['se']:.1f} | {p} | {_fmt(row['train_s'], '{:.0f}')} "
                     f"| {_fmt(row['fix_s'], '{:.0f}')} | {_fmt(row['total_s'], '{:.0f}')} "
                     f"| {_fmt(row['cost_ratio'], '{:.2f}')}x |")
    resumed = [k for k, v in r["timings"].items() if v.get("resumed")]
    machine = (f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['torch_threads']} torch "
               f"thread(s){', ' + m['cuda'] if m['cuda'] else ''}; torch {m['torch']}; {m['date']}.")
    lines += ["", machine,
              f"Command: `{r['command']}`"
              + (f" (resumed steps, times partial: {', '.join(resumed)})" if resumed else ""),
              "", r["verdict"]]
    return "\n".join(lines)


def verdict(rows: list[dict], t: int, s: int) -> str:
    by = {row["key"]: row for row in rows}
    fixed, ref = by["T+fix@S"], by["S@S"]
    p = fixed["p_vs_S"]
    same = p >= NOISE_P
    how = "matched" if same else ("beat" if fixed["top1"] > ref["top1"] else "fell short of")
    cost = "at an unmeasured cost" if fixed["cost_ratio"] is None else f"at {fixed['cost_ratio']:.2f}x the cost"
    return (f"Train at {t} + fix at {s} ({fixed['top1']:.1f}%) {how} train at {s} ({ref['top1']:.1f}%) "
            f"{'within noise' if same else 'beyond noise'} (exact paired McNemar p = {p:.3g}, "
            f"{'>=' if same else '<'} {NOISE_P}), {cost} of training at {s}.")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"photo set under ../shared/data, or a folder with train/ and val/ (default {DEFAULT_DATA})")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EPOCHS}; quick "
                                                            f"{QUICK_EPOCHS})")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"S: fix at and train at this size (default: the one fixres fix chooses; quick "
                        f"{QUICK_TEST_SIZE})")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: fixres's)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_MODEL} on generated images, T={QUICK_TRAIN_SIZE}, S={QUICK_TEST_SIZE}")
    p.add_argument("--resume", action="store_true", help="skip the steps whose output exists (continue a killed run)")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    if args.quick:
        args.test_size = args.test_size or QUICK_TEST_SIZE
    return args


def _fresh(out: Path) -> None:
    """Each run without --resume measures afresh: the step folders of an earlier run go (the data stays)."""
    for old in [*out.glob("train[0-9]*"), *out.glob("fix[0-9]*"), out / TIMINGS]:
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()


def main(argv=None) -> int:
    args = _args(argv)
    out = Path(args.out)
    if not args.resume:
        _fresh(out)
    root = _resolve_data(args)
    if root is None:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    classes = _classes(root)
    t = QUICK_TRAIN_SIZE if args.quick else TRAIN_SIZE
    steps = Steps(args, root, len(classes))
    ckpt_t, wall_t = steps.train(t)
    s, fixed, wall_fix = steps.fix(ckpt_t, t)
    ckpt_s, wall_s = steps.train(s)
    workers = QUICK_WORKERS if args.quick and args.workers is None else args.workers
    outcomes, n, precision = _evaluate_all(root, t, s, {"train_t": ckpt_t, "fixed": fixed, "train_s": ckpt_s},
                                           workers)
    rows = _rows(outcomes, n, t, s, {"train_t": wall_t, "fix": wall_fix, "train_s": wall_s})
    result = {"model": QUICK_MODEL if args.quick else f"{WEIGHTS} (registry weights, new head)",
              "data": str(root), "data_name": "generated (--quick)" if args.quick else root.name,
              "classes": len(classes), "n_train": len(split_index(root, "train")),
              "n_val": len(split_index(root, "val", classes=classes)), "n": n,
              "train_size": t, "test_size": s, "test_size_from": "--test-size" if args.test_size else "chosen by fix",
              "epochs": args.epochs, "batch_size": BATCH_SIZE, "seed": SEED, "precision": precision, "rows": rows,
              "timings": steps.timings, "machine": _machine(),
              "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["main", *argv])}
    result["verdict"] = verdict(rows, t, s)
    write_json(out / RESULT, result)
    print(render(result))
    print(f"results: {out / RESULT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
