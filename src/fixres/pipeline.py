"""The main job, ``fixres fix``: analyse -> sweep -> fine-tune at the chosen size -> statistics -> export -> report.

With a model (``--model/--checkpoint/--weights``) and data (``--data``) it fixes *that* model. With no
arguments it first generates the embedded data set (``fixres.synth``) and trains a small built-in CNN
on it at a low train size with RandomResizedCrop, so a newcomer sees the whole method on a laptop CPU.

Steps, in order (each writes ``RUN_DIR/<step>.json`` atomically and is recorded in ``state.json``; a
rerun after a kill skips the finished steps, and training/fine-tuning resume from their checkpoints):

  data          generate the embedded data set (or index the user's)
  train         train at train_size (embedded default, or a model without weights / with a new head)
  analyse       apparent-size analysis on the data's photo sizes: the recommended test size (section 4.1)
  sweep_before  top-1 at every test size, one pass over the validation images (fold std)
  finetune      fine-tune the chosen parts at the chosen test size (classifier + bn, test DA, cached),
                then export the fixed model (safetensors + fixres.json)
  sweep_after   the fixed model at every test size
  stats         pooled-activation statistics before and after (figures 3-4)
  report        HTML report with the figures, JSON summary

The test size to fix at is the larger of the analysis' recommendation and the best untuned size of
the sweep (after fine-tuning the optimum moves up, never down: paper table 5), unless ``test_size``
is given.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from fixres.atomic import write_json
from fixres import config as config_vocab
from fixres.errors import FixresError, UsageError
from fixres.export import WEIGHTS_NAME

DEFAULT_OUT = Path("runs") / "fix"
#: The embedded default: a small built-in CNN trained on the generated data at a low train size.
DEFAULT_MODEL = "fixres_tiny_resnet"
DEFAULT_TRAIN_SIZE = 64
DEFAULT_TRAIN_EPOCHS = 30
DEFAULT_TRAIN_BATCH = 64
#: A short from-scratch run needs a higher rate than the paper's 0.1 x B/256 (0.025 at B=64) to converge.
EMBEDDED_TRAIN_LR = 0.2
#: Train the embedded model without repeated augmentation: on 2 cores every image-epoch counts.
DEFAULT_TRAIN_REPEATS = 1
DEFAULT_FINETUNE_EPOCHS = 10
DEFAULT_BATCH = 64
DEFAULT_PARTS = ",".join(config_vocab.DEFAULT_PARTS)
#: Default sweep: multiples of the model's stride (appendix B: other sizes suffer border and round-off
#: effects, visible as a saw-tooth in the curve) from SWEEP_LOW x T to SWEEP_HIGH x T.
SWEEP_STEP = 32
#: Images used for the activation statistics (CDFs converge long before the whole validation set).
STATS_IMAGES = 250
SWEEP_LOW = 0.5
SWEEP_HIGH = 3.0
MAX_SWEEP_SIZE = 512
#: Photo sizes read from the data set for the Monte-Carlo analysis and the figure-2 histogram.
MAX_PHOTO_SIZES = 2000
STATE_NAME = "state.json"
STEPS = ("data", "train", "analyse", "sweep_before", "finetune", "sweep_after", "stats", "report")
#: Settings that define a run: a rerun with other values for these must use another folder (or restart).
RUN_KEYS = ("model", "checkpoint", "weights", "num_classes", "data", "train_size", "test_sizes", "test_size",
            "parts", "augment", "finetune_epochs", "train_epochs", "train_augment", "seed", "classes",
            "train_per_class", "val_per_class", "crop_ratio")


@dataclass
class FixConfig:
    """Everything ``fixres fix`` needs; None means "the embedded default" or "the model's own"."""

    model: str | None = None
    checkpoint: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    class_map: str | None = None
    data: str | None = None
    out: str = str(DEFAULT_OUT)
    train_size: int | None = None
    test_sizes: list[int] | None = None
    test_size: int | None = None
    parts: str = DEFAULT_PARTS
    augment: str = "test"
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    train_epochs: int = DEFAULT_TRAIN_EPOCHS
    train_augment: str = "train"
    train_repeats: int = DEFAULT_TRAIN_REPEATS
    train_lr: float | None = None
    batch_size: int = DEFAULT_BATCH
    train_batch_size: int = DEFAULT_TRAIN_BATCH
    lr: float | None = None
    crop_ratio: float | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    device: str = "auto"
    amp: bool = True
    workers: int | None = None
    seed: int = 0
    # embedded data set
    classes: int = config_vocab.DEFAULT_CLASSES
    train_per_class: int = config_vocab.DEFAULT_TRAIN_PER_CLASS
    val_per_class: int = config_vocab.DEFAULT_VAL_PER_CLASS
    stats_sizes: list[int] | None = None
    restart: bool = False
    progress: bool = True

    @property
    def embedded(self) -> bool:
        return self.data is None

    def run_key(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in RUN_KEYS}


def default_test_sizes(train_size: int, *, step: int = SWEEP_STEP) -> list[int]:
    """Multiples of ``step`` from about half to three times the train size (always including it)."""
    lo = max(step, int(round(SWEEP_LOW * train_size / step)) * step)
    hi = min(MAX_SWEEP_SIZE, max(lo, int(round(SWEEP_HIGH * train_size / step)) * step))
    sizes = set(range(lo, hi + 1, step))
    sizes.add(train_size)
    return sorted(sizes)


def choose_test_size(*, recommended: int, sweep_rows: Sequence[dict], train_size: int) -> dict:
    """The size to fix at: max(recommended, best untuned), both measured; returns the choice and why."""
    best = max(sweep_rows, key=lambda r: r["top1"]) if sweep_rows else None
    best_size = int(best["test_size"]) if best else train_size
    chosen = max(int(recommended), best_size)
    reason = ("the apparent-size recommendation" if chosen == int(recommended) and chosen != best_size else
              "the best untuned test size" if chosen == best_size and chosen != int(recommended) else
              "both the recommendation and the best untuned size")
    return {"test_size": chosen, "recommended": int(recommended), "best_untuned": best_size, "reason": reason}


# --------------------------------------------------------------------------- run state

class RunState:
    """``state.json``: which steps finished, how long each took; written atomically after every step."""

    def __init__(self, run_dir: Path, key: dict, *, restart: bool = False) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STATE_NAME
        self.key = key
        state = None
        if self.path.is_file() and not restart:
            try:
                state = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                state = None
        if state is not None and state.get("key") != key:
            diff = sorted(k for k in key if state.get("key", {}).get(k) != key[k])
            raise UsageError(f"{run_dir} holds a run with other settings ({', '.join(diff)}); "
                             "pass --out for a new folder, or --restart to start this one over")
        self.ran: list[str] = []  # steps computed in this call
        self.state = state or {"version": 1, "key": key, "steps": {},
                               "started": _dt.datetime.now().isoformat(timespec="seconds")}

    def done(self, step: str) -> bool:
        finished = bool(self.state["steps"].get(step, {}).get("done"))
        return finished and (step == "report" or (self.run_dir / f"{step}.json").is_file())

    def finish(self, step: str, seconds: float) -> None:
        self.ran.append(step)
        prev = self.state["steps"].get(step, {})
        self.state["steps"][step] = {"done": True, "seconds": round(float(seconds) + prev.get("partial_s", 0.0), 3),
                                     "finished": _dt.datetime.now().isoformat(timespec="seconds")}
        write_json(self.path, self.state)

    def timings(self) -> dict:
        return {k: v["seconds"] for k, v in self.state["steps"].items() if v.get("done")}

    def save(self) -> None:
        write_json(self.path, self.state)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _strip(result: dict, drop: Sequence[str] = ()) -> dict:
    """JSON-ready copy without private keys and bulky per-image arrays."""
    return {k: v for k, v in result.items() if not k.startswith("_") and k not in drop}


# --------------------------------------------------------------------------- the job

def run_fix(config: FixConfig) -> dict:
    """Run (or resume) the whole method; returns the headline numbers and where the report is."""
    from fixres import progress as prog

    say = lambda msg: prog.status(msg, enabled=config.progress)  # noqa: E731
    t_job = time.perf_counter()
    run_dir = Path(config.out)
    _check_config(config)
    if config.restart and run_dir.exists():
        for step in STEPS:
            for p in (run_dir / f"{step}.json",):
                if p.exists():
                    p.unlink()
        for sub in ("train", "finetune", "export", "report"):
            if (run_dir / sub).exists():
                shutil.rmtree(run_dir / sub)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(run_dir, config.run_key(), restart=config.restart)
    state.save()
    if any(state.done(s) for s in STEPS):
        say(f"fixres fix: resuming {run_dir} (done: {', '.join(s for s in STEPS if state.done(s))})")

    import torch

    from fixres import analysis, dist, engine
    from fixres.data import count_image_sizes, read_class_map, resolve_split, scan_folder
    from fixres.models import load_model

    torch.manual_seed(config.seed)
    env = dist.DistEnv(device=dist.resolve_device(config.device))
    precision = engine.precision_for(env.device, amp=config.amp)
    n_steps = len(STEPS)

    def header(i: int, step: str, what: str) -> None:
        say(f"[{i}/{n_steps}] {step}: {what}" + (" (done)" if state.done(step) and step != "report" else ""))

    # ---- 1. data
    header(1, "data", "generating the embedded data set" if config.embedded else f"indexing {config.data}")
    if not state.done("data"):
        t0 = time.perf_counter()
        if config.embedded:
            from fixres.synth import make_dataset
            made = make_dataset(run_dir / "data", classes=config.classes, train_per_class=config.train_per_class,
                                val_per_class=config.val_per_class, seed=config.seed, progress=config.progress)
            data_root = Path(made["root"])
            info = {"root": str(data_root), "embedded": True, "manifest": _strip(made, ("config",)),
                    "synth_config": made.get("config")}
        else:
            data_root = Path(config.data)
            info = {"root": str(data_root), "embedded": False}
        write_json(run_dir / "data.json", info)
        state.finish("data", time.perf_counter() - t0)
    info = _read_json(run_dir / "data.json")
    data_root = Path(info["root"])
    class_map = read_class_map(config.class_map) if config.class_map else None

    # ---- the model as given (or as to be trained)
    model_name = config.model or (DEFAULT_MODEL if not (config.checkpoint or config.weights) else None)
    train_index = scan_folder(resolve_split(data_root, "train"), class_map=class_map)
    val_index = scan_folder(resolve_split(data_root, "val"), class_map=class_map)
    if resolve_split(data_root, "train") == resolve_split(data_root, "val"):
        say("  note: the data has no train/ and val/ folders: fine-tuning and evaluation use the same images")
    num_classes = config.num_classes or (train_index.num_classes if not config.checkpoint else None)
    bundle = load_model(model=model_name, checkpoint=config.checkpoint, weights=config.weights,
                        num_classes=num_classes, train_size=config.train_size or (
                            DEFAULT_TRAIN_SIZE if not (config.checkpoint or config.weights) else None))
    cfg = bundle.data_config.with_overrides(crop_ratio=config.crop_ratio, interpolation=config.interpolation,
                                            mean=config.mean, std=config.std)
    cfg = cfg.with_overrides(num_classes=train_index.num_classes, class_names=tuple(train_index.classes))
    train_size = cfg.train_size
    needs_training = not (config.checkpoint or config.weights) or bool(bundle.meta.get("new_head"))
    test_sizes = sorted(set(config.test_sizes or default_test_sizes(train_size, step=cfg.stride)))

    # ---- 2. train
    train_dir = run_dir / "train"
    if needs_training:
        header(2, "train", f"{bundle.name} at {train_size}px, {config.train_epochs} epochs "
                           f"({'RandomResizedCrop' if config.train_augment == 'train' else config.train_augment})")
        if not state.done("train"):
            from fixres.train import train
            t0 = time.perf_counter()
            from_scratch_default = not (config.model or config.checkpoint or config.weights)
            lr = config.train_lr or (EMBEDDED_TRAIN_LR if from_scratch_default else None)
            # No validation inside training: the sweep right after measures every size on all images.
            result = train(bundle.model, train_index.samples, [], cfg, train_size=train_size,
                           epochs=config.train_epochs, batch_size=config.train_batch_size, lr=lr,
                           out_dir=train_dir, resume=True, repeats=config.train_repeats,
                           augment=config.train_augment, schedule="cosine", warmup_epochs=1, env=env,
                           precision=precision, seed=config.seed, workers=config.workers, progress=config.progress,
                           model_name=bundle.name)
            result["batch_size"] = config.train_batch_size
            write_json(run_dir / "train.json", _strip(result))
            state.finish("train", time.perf_counter() - t0)
    else:
        header(2, "train", "skipped (the model has its weights)")
    base = _base_model(config, bundle, train_dir if needs_training else None, num_classes)

    # ---- 3. analyse
    header(3, "analyse", "apparent object sizes on this data's photos")
    if not state.done("analyse"):
        t0 = time.perf_counter()
        sizes = count_image_sizes(val_index, limit=MAX_PHOTO_SIZES)
        an = analysis.analyze(train_size=train_size, crop_ratio=cfg.crop_ratio, stride=cfg.stride,
                              image_sizes=sizes or None, samples=50_000, seed=config.seed)
        an.pop("_mc", None)
        an["recommended_test_size"] = (an.get("monte_carlo") or {}).get("recommended_test_size",
                                                                         an["recommended_test_size"])
        an["recommended_test_size_closed_form"] = analysis.recommend_test_size(
            train_size=train_size, crop_ratio=cfg.crop_ratio, stride=cfg.stride)["test_size"]
        an["image_sizes"] = sorted({tuple(s) for s in sizes})[:500]
        write_json(run_dir / "analyse.json", an)
        state.finish("analyse", time.perf_counter() - t0)
    an = _read_json(run_dir / "analyse.json")
    mc = an.get("monte_carlo") or {}
    say(f"  objects look {an['ratio']:.3f}x as large at test as in training (eq. 5"
        + (f"; {mc['mean']:.3f} sampled on these photos" if mc.get("mean") else "")
        + f"); recommended test size {an['recommended_test_size']}px")
    # The sweep always covers the sizes the fix may be applied at.
    test_sizes = sorted(set(test_sizes) | {int(an["recommended_test_size"])}
                        | ({config.test_size} if config.test_size else set()))

    from fixres.evaluate import evaluate

    # every accuracy in the run is measured as `fixres eval` measures it (inference precision)
    eval_kw = dict(batch_size=config.batch_size, env=env, precision=engine.inference_precision(env.device, config.amp),
                   workers=config.workers, progress=config.progress)
    # ---- 4. sweep before
    header(4, "sweep_before", f"top-1 at test sizes {','.join(map(str, test_sizes))}")
    if not state.done("sweep_before"):
        t0 = time.perf_counter()
        sweep = evaluate(base.model, val_index, cfg, test_sizes=test_sizes, **eval_kw)
        write_json(run_dir / "sweep_before.json", _strip(sweep))
        state.finish("sweep_before", time.perf_counter() - t0)
    before = _read_json(run_dir / "sweep_before.json")
    say("  " + _curve_line(before))

    # ---- 5. fine-tune at the chosen size, export
    choice = ({"test_size": config.test_size, "reason": "given"} if config.test_size else
              choose_test_size(recommended=an["recommended_test_size"], sweep_rows=before["rows"],
                               train_size=train_size))
    test_size = int(choice["test_size"])
    header(5, "finetune", f"{config.parts} at {test_size}px ({choice['reason']}), {config.finetune_epochs} epochs, "
                          f"{config.augment} DA")
    export_dir = run_dir / "export"
    if not state.done("finetune"):
        from fixres.export import export_model
        from fixres.finetune import finetune
        t0 = time.perf_counter()
        fixed = _base_model(config, bundle, train_dir if needs_training else None, num_classes)
        ft = finetune(fixed.model, train_index.samples, val_index.samples, cfg, test_size=test_size,
                      parts=config.parts, augment=config.augment, epochs=config.finetune_epochs, lr=config.lr,
                      batch_size=config.batch_size, cache=True, out_dir=run_dir / "finetune", resume=True, env=env,
                      precision=precision, seed=config.seed, workers=config.workers, progress=config.progress,
                      evaluate_before=False, evaluate_after=False)  # the sweeps measure every size anyway
        path = export_model(fixed.model, export_dir, model_name=fixed.name, cfg=cfg, test_size=test_size,
                            train_size=train_size, class_names=list(train_index.classes))
        ft_out = {**_strip(ft), "choice": choice, "export_path": str(path)}
        write_json(run_dir / "export.json", {"path": str(path), "test_size": test_size, "train_size": train_size})
        write_json(run_dir / "finetune.json", ft_out)
        state.finish("finetune", time.perf_counter() - t0)
    fixed = load_model(checkpoint=str(export_dir / WEIGHTS_NAME))

    # ---- 6. sweep after
    header(6, "sweep_after", "the fixed model at every test size")
    if not state.done("sweep_after"):
        t0 = time.perf_counter()
        sweep = evaluate(fixed.model, val_index, cfg, test_sizes=test_sizes, **eval_kw)
        row = next(r for r in sweep["rows"] if r["test_size"] == test_size)
        from fixres.export import export_model
        # Export again, now with the accuracy measured at the fixed size in the metadata.
        export_model(fixed.model, export_dir, model_name=fixed.name, cfg=cfg, test_size=test_size,
                     train_size=train_size, class_names=list(train_index.classes),
                     accuracy={"top1": row["top1"], "top1_std": row["top1_std"], "test_size": test_size,
                               "n": row["n"]})
        write_json(run_dir / "sweep_after.json", _strip(sweep))
        state.finish("sweep_after", time.perf_counter() - t0)
    after = _read_json(run_dir / "sweep_after.json")
    say("  " + _curve_line(after))

    # ---- 7. activation statistics
    stats_sizes = sorted(set(config.stats_sizes or _stats_sizes(train_size, test_size, test_sizes)))
    header(7, "stats", f"pooled activations at {','.join(map(str, stats_sizes))}px, before and after")
    if not state.done("stats"):
        t0 = time.perf_counter()
        stats = {"sizes": stats_sizes}
        grid = None
        for label, b in (("before", base), ("after", fixed)):
            raw = _activation_stats(b.model, val_index.samples, cfg, stats_sizes, env=env, precision=precision,
                                    batch_size=config.batch_size, workers=config.workers, grid=grid)
            stats[label] = normalize_stats(raw)
            stats[label]["pooled_from"] = raw.get("pooled_from")
            first = next(iter(stats[label]["sizes"].values()), None)
            grid = first["x"] if first and grid is None else grid  # same x axis before and after
        write_json(run_dir / "stats.json", stats)
        state.finish("stats", time.perf_counter() - t0)

    # ---- 8. report (rebuilt whenever a step ran in this call; `fixres report` rebuilds it on demand)
    header(8, "report", "writing the HTML report")
    from fixres.report import REPORT_DIR, REPORT_JSON, write_report
    report_json = run_dir / REPORT_DIR / REPORT_JSON
    if state.done("report") and report_json.is_file() and not state.ran:
        summary = _read_json(report_json)
    else:
        t0 = time.perf_counter()
        write_json(run_dir / "run.json", _run_info(config, bundle, env, precision, state, train_size, test_size,
                                                  test_sizes, data_root, choice, torch.get_num_threads()))
        summary = write_report(run_dir)
        state.finish("report", time.perf_counter() - t0)
        # run.json keeps every step's time, the report's own included (the page shows the earlier ones).
        write_json(run_dir / "run.json", _run_info(config, bundle, env, precision, state, train_size, test_size,
                                                  test_sizes, data_root, choice, torch.get_num_threads()))
    head = summary["headline"]
    return {"run_dir": str(run_dir), "report": summary["html"], "headline": head, "export": str(export_dir),
            "choice": choice, "seconds": round(time.perf_counter() - t_job, 1)}


def _run_info(config, bundle, env, precision, state, train_size, test_size, test_sizes, data_root, choice,
              threads) -> dict:
    return {"model": bundle.name, "source": bundle.source, "train_size": train_size, "test_size": test_size,
            "test_sizes": test_sizes, "data": str(data_root), "choice": choice,
            "config": _strip(asdict(config), ("progress",)), "device": str(env.device),
            "precision": precision.describe(), "started": state.state.get("started"),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"), "timings": state.timings(),
            "torch_threads": threads}


def _check_config(config: FixConfig) -> None:
    if config.augment not in ("test", "test2", "train"):
        raise UsageError(f"unknown fine-tuning augmentation {config.augment!r}; choose test, test2 or train")
    if config.train_augment not in ("train", "control"):
        raise UsageError(f"unknown training augmentation {config.train_augment!r}; choose train or control")
    if config.data is not None and not Path(config.data).exists():
        raise UsageError(f"data folder not found: {config.data}")


def _base_model(config: FixConfig, bundle, train_dir: Path | None, num_classes: int | None):
    """A fresh copy of the model before the fix: the trained one from ``train_dir``, or the user's."""
    from fixres.models import load_model
    if train_dir is not None:
        path = train_dir / WEIGHTS_NAME
        if not path.is_file():
            raise FixresError(f"training finished without writing {path}; rerun with --restart")
        return load_model(checkpoint=str(path))
    model_name = config.model or (DEFAULT_MODEL if not (config.checkpoint or config.weights) else None)
    return load_model(model=model_name, checkpoint=config.checkpoint, weights=config.weights,
                      num_classes=config.num_classes, train_size=config.train_size)


def _stats_sizes(train_size: int, test_size: int, test_sizes: Sequence[int]) -> list[int]:
    """Figure 3/4 sizes: half the train size, the train size, the fixed size and the largest swept."""
    half = min(test_sizes, key=lambda s: abs(s - train_size // 2))
    return [half, train_size, test_size, max(test_sizes)]


def _curve_line(sweep: dict) -> str:
    return "top-1: " + ", ".join(f"{r['test_size']}px {r['top1']:.1f}" for r in sorted(sweep["rows"],
                                                                                        key=lambda r: r["test_size"]))


def _activation_stats(model, samples, cfg, sizes, *, env, precision, batch_size, workers, grid=None) -> dict:
    """Pooled-activation CDFs per size (``fixres.stats``), on a given x grid when ``grid`` is set."""
    import numpy as np

    from fixres import stats as fstats
    return fstats.activation_stats(model, samples, cfg, test_sizes=sizes, batch_size=batch_size, env=env,
                                   precision=precision, workers=workers, progress=False, max_images=STATS_IMAGES,
                                   grid=None if grid is None else np.asarray(grid, dtype=float))


def normalize_stats(raw: dict) -> dict:
    """A ``fixres.stats.activation_stats`` result as {"sizes": {size: {"x", "cdf", "zeros", "above_2"}}},
    the shape the report reads."""
    return {"sizes": {str(row["test_size"]): {"x": row["cdf_x"], "cdf": row["cdf"], "zeros": row["frac_zero"],
                                              "above_2": row["frac_above_2"]}
                      for row in raw["sizes"]}}
