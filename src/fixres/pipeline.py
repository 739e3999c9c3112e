"""The main job, ``fixres fix``: analyse -> sweep -> fix at every candidate size -> choose -> statistics -> report.

With a model (``--model/--checkpoint/--weights``) and data (``--data``) it fixes *that* model. With no
arguments it first generates the embedded data set (``fixres.synth``) and trains a small built-in CNN
on it at a low train size with RandomResizedCrop, so a newcomer sees the whole method on a laptop CPU.

The job is a table of steps (``STEP_TABLE``), each one function. Every step writes
``RUN_DIR/<step>.json`` atomically and is recorded in ``state.json`` with its *key*: every input its
result depends on (the settings it reads, the content hash of the checkpoint, a fingerprint of the
data index, and the keys of the steps it reads from). A rerun recomputes exactly the steps whose key
changed, and the steps downstream of them, and says which inputs changed; with nothing changed it
recomputes nothing. A step killed half-way resumes (training and fine-tuning from their checkpoints)
when its inputs are still the same, and starts over otherwise.

  data          generate the embedded data set (or index the user's; validated before anything is written)
  train         train at train_size on the fitting part of the training images (embedded default,
                or a model without weights / with a new head)
  analyse       apparent-size analysis on the data's photo sizes: the recommended test size (section 4.1)
  sweep_before  top-1 (NLL, ECE) at every test size on the validation images, one pass (fold std)
  schedule      fine-tuning rate and epochs chosen on the held-out images from a small grid (16.5)
  select        every candidate size fixed at its own size (classifier + bn, test DA, cached), scored on
                a held-out part of the *training* images and on val, its cost measured (``fixres.candidates``)
  finetune      the chosen candidate (most accurate on the held-out images within the deployment budget;
                ``--label-free``: bn-recalibrate at the recommended size), exported (safetensors + fixres.json)
  sweep_after   the fixed model at every test size
  stats         pooled-activation statistics before and after (figures 3-4, KS distance to T)
  report        HTML report with the figures, JSON summary

The size is never chosen on the validation images the headline reports (``fixres.fixsize``); the model
is built once, and every fix works on one copy of it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fixres import analysis, candidates, dist, engine, fixsize
from fixres import config as config_vocab
from fixres import progress as prog
from fixres import stats as fstats
from fixres.atomic import write_json
from fixres.candidates import estimate_seconds, latency_ms, load_adapted
from fixres.checkpoint import load_state_dict
from fixres.data import (count_image_sizes, index_val_onto, missing_classes_warning, read_class_map, resolve_split,
                         scan_folder)
from fixres.errors import FixresError, UsageError
from fixres.evaluate import evaluate
from fixres.exporting import WEIGHTS_NAME, export_model
from fixres.fingerprint import digest, file_digest, index_fingerprint
from fixres.images import load_rgb
from fixres.models import load_model
from fixres.progress import format_duration
from fixres.report import REPORT_DIR, REPORT_JSON, write_report
from fixres.runstate import NOT_RUN, RunState
from fixres.synth import make_dataset
from fixres.train import STATE_NAME as TRAIN_STATE
from fixres.train import train
from fixres.transforms import build_transform

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
#: Monte-Carlo samples of the apparent-size analysis.
ANALYSIS_SAMPLES = 50_000
STEPS = ("data", "train", "analyse", "sweep_before", "schedule", "select", "finetune", "sweep_after", "stats",
         "report")
#: Working folders of steps: wiped when the step's inputs changed (their partial state would not fit).
STEP_FOLDERS = {"train": ("train",), "schedule": ("schedule",), "select": ("candidates",),
                "finetune": ("finetune", "export")}
#: Default cap on the time the candidate fixes may take (estimated up front; farthest sizes dropped first).
DEFAULT_SELECT_BUDGET_MIN = 60.0
#: Training images read, and the batch of the timed forwards, to estimate the time per image before the run
#: starts (small: on a CPU a large model's probe must not cost minutes).
PLAN_PROBE_IMAGES = 8
PLAN_PROBE_BATCH = 4

choose_test_size = fixsize.choose_test_size


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
    holdout_fraction: float = fixsize.HOLDOUT_FRACTION
    # selection after fixing (issue 16)
    candidates: list[int] | None = None
    select_budget_min: float | None = DEFAULT_SELECT_BUDGET_MIN
    max_test_size: int | None = None
    budget_ms: float | None = None
    budget_gflops: float | None = None
    tune_schedule: bool = True
    temperature_scale: bool = False
    label_free: bool = False
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

    @property
    def has_weights(self) -> bool:
        return bool(self.checkpoint or self.weights)

    @property
    def model_name(self) -> str | None:
        return self.model or (None if self.has_weights else DEFAULT_MODEL)


def default_test_sizes(train_size: int, *, step: int = SWEEP_STEP) -> list[int]:
    """Multiples of ``step`` from about half to three times the train size (always including it)."""
    lo = max(step, int(round(SWEEP_LOW * train_size / step)) * step)
    hi = min(MAX_SWEEP_SIZE, max(lo, int(round(SWEEP_HIGH * train_size / step)) * step))
    sizes = set(range(lo, hi + 1, step))
    sizes.add(train_size)
    return sorted(sizes)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _strip(result: dict, drop: Sequence[str] = ()) -> dict:
    """JSON-ready copy without private keys and bulky per-image arrays."""
    return {k: v for k, v in result.items() if not k.startswith("_") and k not in drop}


# --------------------------------------------------------------------------- the run's context

@dataclass
class FixContext:
    """What the steps share: the config, the run folder and state, the data, the model (built once)."""

    config: FixConfig
    run_dir: Path
    say: Callable[[str], None]
    state: RunState | None = None
    keys: dict = field(default_factory=dict)
    data_root: Path | None = None
    train_index: object = None
    val_index: object = None
    fit: list = field(default_factory=list)
    holdout: list = field(default_factory=list)
    fingerprints: dict = field(default_factory=dict)
    bundle: object = None
    cfg: object = None
    env: object = None
    precision: object = None
    eval_precision: object = None
    test_sizes: list[int] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    schedule: dict = field(default_factory=dict)
    choice: dict = field(default_factory=dict)
    _base_ready: bool = False
    _work: object = None
    _holds: str = ""  # what the working copy holds: "export" (the fixed model) or a candidate
    _checkpoint_sha: str | None = None

    # ---- data
    def index_data(self, data_root: Path) -> None:
        """Index train/ and val/ (val mapped onto the training classes by name); split off the held-out part."""
        c = self.config
        class_map = read_class_map(c.class_map) if c.class_map else None
        train_root, val_root = resolve_split(data_root, "train"), resolve_split(data_root, "val")
        self.train_index = scan_folder(train_root, class_map=class_map, num_classes=c.num_classes)
        self.val_index = index_val_onto(val_root, self.train_index, num_classes=c.num_classes)
        msg = missing_classes_warning(self.val_index)
        if msg:
            self.say("  warning: " + msg)
        if train_root == val_root:
            self.say("  note: the data has no train/ and val/ folders: fine-tuning and evaluation use the same images")
        self.data_root = Path(data_root)
        self.fit, self.holdout = fixsize.holdout_split(self.train_index.samples, fraction=c.holdout_fraction,
                                                       seed=c.seed)
        self.fingerprints = {"train_images": index_fingerprint(self.train_index.samples),
                             "val_images": index_fingerprint(self.val_index.samples),
                             "classes": digest(list(self.train_index.classes))}

    # ---- the model, built once
    @property
    def needs_training(self) -> bool:
        return not self.config.has_weights or bool(self.bundle.meta.get("new_head"))

    def load_model(self) -> None:
        c = self.config
        num_classes = c.num_classes or (self.train_index.num_classes if not c.checkpoint else None)
        self.bundle = load_model(model=c.model_name, checkpoint=c.checkpoint, weights=c.weights,
                                 num_classes=num_classes,
                                 train_size=c.train_size or (None if c.has_weights else DEFAULT_TRAIN_SIZE))
        cfg = self.bundle.data_config.with_overrides(crop_ratio=c.crop_ratio, interpolation=c.interpolation,
                                                     mean=c.mean, std=c.std)
        self.cfg = cfg.with_overrides(num_classes=self.train_index.num_classes,
                                      class_names=tuple(self.train_index.classes))

    def base(self):
        """The model before the fix (trained weights loaded when training ran in an earlier call)."""
        if not self._base_ready:
            if self.needs_training and "train" not in self.state.ran:
                _load_weights(self.bundle.model, self.run_dir / "train" / WEIGHTS_NAME)
            self.bundle.model.eval()
            self._base_ready = True
        return self.bundle.model

    def work(self, holds: str):
        """The working copy (one deep copy of the model before the fix), reset to the weights before the fix
        (copied from the model before the fix, which is only ever evaluated: no third copy in memory)."""
        if self._work is None:
            self._work = copy.deepcopy(self.base())
        else:
            self._work.load_state_dict(self.base().state_dict(), strict=True)
        self._holds = holds
        return self._work

    def fixed(self):
        """The fixed model: the working copy holding the exported weights."""
        if self._holds != "export":
            model = self.work("export")
            _load_weights(model, self.run_dir / "export" / WEIGHTS_NAME)
        return self._work

    def checkpoint_sha(self) -> str | None:
        if self.config.checkpoint and self._checkpoint_sha is None:
            self._checkpoint_sha = file_digest(self.config.checkpoint)
        return self._checkpoint_sha

    def read(self, step: str) -> dict:
        return _read_json(self.run_dir / f"{step}.json")

    def eval_kw(self) -> dict:
        c = self.config
        return dict(batch_size=c.batch_size, env=self.env, precision=self.eval_precision, workers=c.workers,
                    progress=c.progress)


def _load_weights(model, path: Path) -> None:
    """Load a state dict saved by this run into an already built model (strict)."""
    if not path.is_file():
        raise FixresError(f"{path} is missing; rerun with --restart")
    model.load_state_dict(load_state_dict(path), strict=True)


# --------------------------------------------------------------------------- step keys (what each result depends on)

def _key_data(x: FixContext) -> dict:
    c = x.config
    if c.embedded:
        return {"data": "embedded", "synth_classes": c.classes, "synth_train_per_class": c.train_per_class,
                "synth_val_per_class": c.val_per_class, "synth_seed": c.seed}
    return {"data": str(Path(c.data).resolve())}


def _key_model(x: FixContext) -> dict:
    """The model as given: its name, the checkpoint's content, registry weights, head and train size."""
    c = x.config
    return {"model": c.model_name, "checkpoint_sha256": x.checkpoint_sha(), "weights": c.weights,
            "num_classes": c.num_classes, "train_size": x.cfg.train_size, "stride": x.cfg.stride,
            "classes": x.fingerprints["classes"]}


def _key_prep(x: FixContext) -> dict:
    cfg = x.cfg
    return {"crop_ratio": cfg.crop_ratio, "interpolation": cfg.interpolation, "mean": list(cfg.mean),
            "std": list(cfg.std)}


def _key_train_images(x: FixContext) -> dict:
    return {"train_images": x.fingerprints["train_images"], "holdout_fraction": x.config.holdout_fraction,
            "holdout_seed": x.config.seed}


def _key_base(x: FixContext) -> dict:
    """The model before the fix: the trained one (everything training read) or the one given."""
    return x.keys["train"] if x.needs_training else _key_model(x)


def _key_eval(x: FixContext) -> dict:
    return {"test_sizes": x.test_sizes, "batch_size": x.config.batch_size,
            "eval_precision": x.eval_precision.describe(), "val_images": x.fingerprints["val_images"]}


def key_train(x: FixContext) -> dict:
    c = x.config
    return {**_key_model(x), **_key_prep(x), **_key_train_images(x), "train_epochs": c.train_epochs,
            "train_augment": c.train_augment, "train_repeats": c.train_repeats, "train_lr": c.train_lr,
            "train_batch_size": c.train_batch_size, "seed": c.seed, "precision": x.precision.describe()}


def key_analyse(x: FixContext) -> dict:
    return {"train_size": x.cfg.train_size, "stride": x.cfg.stride, "crop_ratio": x.cfg.crop_ratio,
            "val_images": x.fingerprints["val_images"], "analysis_seed": x.config.seed}


def key_sweep_before(x: FixContext) -> dict:
    return {**_key_base(x), **_key_prep(x), **_key_eval(x)}


def _key_finetuning(x: FixContext) -> dict:
    c = x.config
    return {**_key_base(x), **_key_prep(x), **_key_train_images(x), "parts": c.parts, "augment": c.augment,
            "batch_size": c.batch_size, "seed": c.seed, "precision": x.precision.describe(),
            "eval_precision": x.eval_precision.describe()}


def key_schedule(x: FixContext) -> dict:
    grid = [list(candidates.SCHEDULE_LR_FACTORS), list(candidates.SCHEDULE_EPOCH_FACTORS)]
    return {**_key_finetuning(x), "schedule_size": candidates.schedule_size(x),
            "finetune_epochs": x.config.finetune_epochs, "lr": x.config.lr, "schedule_grid": grid}


def key_select(x: FixContext) -> dict:
    return {**_key_finetuning(x), "val_images": x.fingerprints["val_images"], "candidates": x.candidates,
            "schedule_lr": x.schedule.get("lr"), "schedule_epochs": x.schedule.get("epochs"),
            "select_budget_min": x.config.select_budget_min}


def key_finetune(x: FixContext) -> dict:
    c = x.config
    if c.label_free:
        return {**_key_base(x), **_key_prep(x), **_key_train_images(x), "label_free": True,
                "fix_test_size": x.choice["test_size"], "batch_size": c.batch_size,
                "precision": x.precision.describe()}
    return {**x.keys["select"], "fix_test_size": x.choice["test_size"], "temperature_scale": c.temperature_scale}


def key_sweep_after(x: FixContext) -> dict:
    return {**x.keys["finetune"], **_key_eval(x)}


def key_stats(x: FixContext) -> dict:
    return {**x.keys["finetune"], "stats_sizes": _stats_sizes_of(x), "val_images": x.fingerprints["val_images"],
            "batch_size": x.config.batch_size, "precision": x.precision.describe()}


def key_report(x: FixContext) -> dict:
    merged: dict = {}
    for step in STEPS[:-1]:
        merged.update(x.keys.get(step, {}))
    return merged


# --------------------------------------------------------------------------- the steps

def run_data(x: FixContext) -> None:
    c = x.config
    if c.embedded:
        made = make_dataset(x.run_dir / "data", classes=c.classes, train_per_class=c.train_per_class,
                            val_per_class=c.val_per_class, seed=c.seed, progress=c.progress,
                            overwrite=True)  # this step runs only when the data's settings changed
        info = {"root": str(made["root"]), "embedded": True, "manifest": _strip(made, ("config",)),
                "synth_config": made.get("config")}
    else:
        info = {"root": str(c.data), "embedded": False}
    write_json(x.run_dir / "data.json", info)


def run_train(x: FixContext) -> None:
    c = x.config
    lr = c.train_lr or (EMBEDDED_TRAIN_LR if not (c.model or c.has_weights) else None)
    train_dir = x.run_dir / "train"
    # Trained on the fitting part only: the held-out images stay unseen for choosing the test size.
    # No validation inside training: the sweep right after measures every size on all images.
    result = train(x.bundle.model, x.fit, [], x.cfg, train_size=x.cfg.train_size, epochs=c.train_epochs,
                   batch_size=c.train_batch_size, lr=lr, out_dir=train_dir, resume=(train_dir / TRAIN_STATE).is_file(),
                   repeats=c.train_repeats, augment=c.train_augment, schedule="cosine", warmup_epochs=1,
                   env=x.env, precision=x.precision, seed=c.seed, workers=c.workers, progress=c.progress,
                   model_name=x.bundle.name)
    result["batch_size"] = c.train_batch_size
    write_json(x.run_dir / "train.json", _strip(result))


def run_analyse(x: FixContext) -> None:
    cfg = x.cfg
    sizes = count_image_sizes(x.val_index, limit=MAX_PHOTO_SIZES)
    an = analysis.analyze(train_size=cfg.train_size, crop_ratio=cfg.crop_ratio, stride=cfg.stride,
                          image_sizes=sizes or None, samples=ANALYSIS_SAMPLES, seed=x.config.seed)
    an.pop("_mc", None)
    an["recommended_test_size"] = (an.get("monte_carlo") or {}).get("recommended_test_size",
                                                                     an["recommended_test_size"])
    an["recommended_test_size_closed_form"] = analysis.recommend_test_size(
        train_size=cfg.train_size, crop_ratio=cfg.crop_ratio, stride=cfg.stride)["test_size"]
    an["image_sizes"] = sorted({tuple(s) for s in sizes})[:500]
    write_json(x.run_dir / "analyse.json", an)


def run_sweep_before(x: FixContext) -> None:
    sweep = evaluate(x.base(), x.val_index, x.cfg, test_sizes=x.test_sizes, **x.eval_kw())
    write_json(x.run_dir / "sweep_before.json", _strip(sweep))


def run_finetune(x: FixContext) -> None:
    """The chosen candidate (or, label-free, batch-norm recalibration at the recommended size), exported."""
    test_size = int(x.choice["test_size"])
    model = x.work(holds="export")
    if x.config.label_free:
        ft = candidates.label_free_adapt(x, model, test_size)
    else:
        folder = x.run_dir / "candidates" / str(test_size)
        load_adapted(model, folder / "adapted.safetensors")
        ft = _read_json(folder / "finetune_result.json")
        if x.config.temperature_scale and x.holdout:
            ft["temperature"] = candidates.temperature_scale(x, model, test_size)
    path = export_model(model, x.run_dir / "export", model_name=x.bundle.name, cfg=x.cfg, test_size=test_size,
                        train_size=x.cfg.train_size, class_names=list(x.train_index.classes))
    write_json(x.run_dir / "export.json", {"path": str(path), "test_size": test_size,
                                          "train_size": x.cfg.train_size})
    write_json(x.run_dir / "finetune.json", {**ft, "choice": x.choice, "export_path": str(path)})


def run_sweep_after(x: FixContext) -> None:
    test_size = int(x.choice["test_size"])
    fixed = x.fixed()
    sweep = evaluate(fixed, x.val_index, x.cfg, test_sizes=x.test_sizes, **x.eval_kw())
    row = next(r for r in sweep["rows"] if r["test_size"] == test_size)
    # Export again, now with the accuracy measured at the fixed size in the metadata.
    export_model(fixed, x.run_dir / "export", model_name=x.bundle.name, cfg=x.cfg, test_size=test_size,
                 train_size=x.cfg.train_size, class_names=list(x.train_index.classes),
                 accuracy={"top1": row["top1"], "top1_std": row["top1_std"], "test_size": test_size, "n": row["n"]})
    write_json(x.run_dir / "sweep_after.json", _strip(sweep))


def run_stats(x: FixContext) -> None:
    """Figures 3-4; KS distance at each size to the pooled values of the model *before* the fix at T (the
    distribution its classifier was trained on), for the model before and after the fix."""
    sizes = _stats_sizes_of(x)
    stats: dict = {"sizes": sizes, "ks_reference": f"the model before the fix at {x.cfg.train_size}px"}
    grid = reference = None
    for label, model in (("before", x.base()), ("after", x.fixed())):
        raw = _activation_stats(model, x.val_index.samples, x.cfg, sizes, env=x.env, precision=x.precision,
                                batch_size=x.config.batch_size, workers=x.config.workers, grid=grid,
                                reference=reference)
        pooled = raw.pop("_pooled")
        reference = pooled[x.cfg.train_size] if reference is None else reference
        stats[label] = normalize_stats(raw)
        stats[label]["pooled_from"] = raw.get("pooled_from")
        first = next(iter(stats[label]["sizes"].values()), None)
        grid = first["x"] if first and grid is None else grid  # same x axis before and after
    write_json(x.run_dir / "stats.json", stats)


def run_report(x: FixContext) -> None:
    write_json(x.run_dir / "run.json", _run_info(x, torch.get_num_threads()))
    write_report(x.run_dir)


def _stats_sizes_of(x: FixContext) -> list[int]:
    return sorted(set(x.config.stats_sizes or _stats_sizes(x.cfg.train_size, int(x.choice["test_size"]),
                                                           x.test_sizes)))


# --------------------------------------------------------------------------- the table of steps

@dataclass(frozen=True)
class Step:
    """One step of the job: what it does (for the header line), what its result depends on, how to run it."""

    name: str
    describe: Callable[[FixContext], str]
    key: Callable[[FixContext], dict]
    run: Callable[[FixContext], None]
    applies: Callable[[FixContext], bool] = lambda x: True
    skipped: str = ""  # said when the step does not apply
    output: str | None = None  # result file checked before trusting a finished step (default <name>.json)


def _describe_train(x: FixContext) -> str:
    c = x.config
    da = "RandomResizedCrop" if c.train_augment == "train" else c.train_augment
    return f"{x.bundle.name} at {x.cfg.train_size}px, {c.train_epochs} epochs ({da}), {len(x.fit)} images"


def _describe_select(x: FixContext) -> str:
    where = (f"on {len(x.holdout)} held-out training images (not the validation images)" if x.holdout else
             "(no held-out images)")
    return f"fix at every candidate size {','.join(map(str, x.candidates))}px, choose {where}"


def _describe_schedule(x: FixContext) -> str:
    return (f"fine-tuning rate x{'/'.join(f'{f:g}' for f in candidates.SCHEDULE_LR_FACTORS)} and epochs "
            f"x{'/'.join(map(str, candidates.SCHEDULE_EPOCH_FACTORS))} at {candidates.schedule_size(x)}px, chosen on "
            f"{len(x.holdout)} held-out training images")


def _tunes_schedule(x: FixContext) -> bool:
    c = x.config
    return c.tune_schedule and not c.label_free and bool(x.holdout) and c.lr is None


def _describe_finetune(x: FixContext) -> str:
    c = x.config
    if c.label_free:
        return (f"{candidates.LABEL_FREE_METHOD} at {x.choice['test_size']}px on unlabeled training images "
                f"({x.choice['reason']})")
    return (f"the candidate fixed at {x.choice['test_size']}px ({c.parts}, {x.schedule.get('epochs')} epochs, "
            f"{c.augment} DA)" + (", temperature-scaled" if c.temperature_scale else "") + ", exported")


STEP_TABLE: tuple[Step, ...] = (
    Step("data", lambda x: "generating the embedded data set" if x.config.embedded else f"indexing {x.config.data}",
         _key_data, run_data),
    Step("train", _describe_train, key_train, run_train, applies=lambda x: x.needs_training,
         skipped="the model has its weights"),
    Step("analyse", lambda x: "apparent object sizes on this data's photos", key_analyse, run_analyse),
    Step("sweep_before", lambda x: f"top-1 at test sizes {','.join(map(str, x.test_sizes))}", key_sweep_before,
         run_sweep_before),
    Step("schedule", _describe_schedule, key_schedule, candidates.run_schedule, applies=_tunes_schedule,
         skipped="fine-tuning rate and epochs as given"),
    Step("select", _describe_select, key_select, candidates.run_select, applies=lambda x: not x.config.label_free,
         skipped="label-free: the size is the analysis' recommendation"),
    Step("finetune", _describe_finetune, key_finetune, run_finetune),
    Step("sweep_after", lambda x: "the fixed model at every test size", key_sweep_after, run_sweep_after),
    Step("stats", lambda x: f"pooled activations at {','.join(map(str, _stats_sizes_of(x)))}px, before and after",
         key_stats, run_stats),
    Step("report", lambda x: "writing the HTML report", key_report, run_report, output="report/report.json"),
)
assert tuple(s.name for s in STEP_TABLE) == STEPS


def _execute(x: FixContext, i: int, step: Step, recomputed: dict) -> None:
    """Run ``step`` when its key changed (or it never finished); say which inputs changed."""
    n = len(STEP_TABLE)
    if not step.applies(x):
        x.say(f"[{i}/{n}] {step.name}: skipped ({step.skipped})")
        x.state.forget(step.name)
        _after_skipped(x, step.name)
        return
    key = step.key(x)
    x.keys[step.name] = key
    output = x.run_dir / (step.output or f"{step.name}.json")
    why = x.state.stale(step.name, key, output)
    if why is None and not (step.name == "report" and x.state.ran):
        x.say(f"[{i}/{n}] {step.name}: {step.describe(x)} (done)")
        _after_step(x, step.name)
        return
    x.say(f"[{i}/{n}] {step.name}: {step.describe(x)}")
    why = why or ["an earlier step was recomputed"]
    if why != [NOT_RUN]:
        recomputed[step.name] = why
        plain = len(why) == 1 and " " in why[0]  # a reason, not input names
        x.say(f"  recomputing {step.name}: " + (why[0] if plain else "changed " + ", ".join(why)))
    if not x.state.partial_matches(step.name, key):
        for sub in STEP_FOLDERS.get(step.name, ()):  # a partial state of other inputs must not be resumed
            shutil.rmtree(x.run_dir / sub, ignore_errors=True)
    x.state.begin(step.name, key)
    t0 = time.perf_counter()
    step.run(x)
    x.state.finish(step.name, key, time.perf_counter() - t0)
    _after_step(x, step.name)


def _after_step(x: FixContext, name: str) -> None:
    """What later steps (and their keys) need from a step's result."""
    if name == "analyse":
        an = x.read("analyse")
        mc = an.get("monte_carlo") or {}
        x.say(f"  objects look {an['ratio']:.3f}x as large at test as in training (eq. 5"
              + (f"; {mc['mean']:.3f} sampled on these photos" if mc.get("mean") else "")
              + f"); recommended test size {an['recommended_test_size']}px")
        x.candidates = _candidate_list(x)
        # The sweep covers every candidate (their untuned accuracy) and the recommendation.
        x.test_sizes = sorted(set(x.test_sizes) | set(x.candidates) | {int(an["recommended_test_size"])})
    elif name in ("sweep_before", "sweep_after"):
        x.say("  " + _curve_line(x.read(name)))
    elif name == "schedule":
        sched = x.read("schedule")
        x.schedule = {"lr": sched["lr"], "epochs": sched["epochs"], "how": sched["how"]}
        x.say(f"  fine-tuning schedule: lr {sched['lr']:g}, {sched['epochs']} epochs ({sched['how']})")
    elif name == "select":
        x.choice = candidates.choose_after_fixing(x)
        x.say(f"  fixed size {x.choice['test_size']}px: {x.choice['chosen_on']}")


def _after_skipped(x: FixContext, name: str) -> None:
    c = x.config
    if name == "schedule":
        x.schedule = {"lr": c.lr, "epochs": c.finetune_epochs,
                      "how": "given" if c.lr is not None or not c.tune_schedule else "default (no held-out images)"}
    elif name == "select":  # label-free
        rec = int(x.read("analyse")["recommended_test_size"])
        size = c.test_size or rec
        how = ("given (--test-size)" if c.test_size else
               "the apparent-size recommendation: it needs no labels, and it is the size at which objects "
               "look as large as in training (section 4.1)")
        x.choice = {"test_size": size, "method": "label-free", "reason": how, "chosen_on": how, "recommended": rec,
                    "n_images": 0, "why_not_recommended": None}


def _candidate_list(x: FixContext) -> list[int]:
    c = x.config
    if c.test_size:
        return [c.test_size]
    if not x.holdout:  # nothing to choose on without looking at val: the analysis' recommendation only
        return [int(x.read("analyse")["recommended_test_size"])]
    if c.candidates:
        return sorted(set(c.candidates))
    sizes = fixsize.candidate_sizes(x.cfg.train_size, x.cfg.stride,
                                    recommended_unrounded=candidates.recommended_exact(x))
    return [s for s in sizes if s <= MAX_SWEEP_SIZE]


# --------------------------------------------------------------------------- the job

def run_fix(config: FixConfig) -> dict:
    """Run (or resume) the whole method; returns the headline numbers, where the report is, and which
    steps were recomputed because their inputs changed (``recomputed``: {step: [changed inputs]})."""
    t_job = time.perf_counter()
    x = FixContext(config=config, run_dir=Path(config.out),
                   say=lambda msg: prog.status(msg, enabled=config.progress))
    _check_config(config)
    _setup_runtime(x)
    if not config.embedded:  # a refused data set or model leaves no trace in the run folder
        x.index_data(Path(config.data))
        _build_model(x)
    _prepare_folder(x)
    recomputed: dict[str, list[str]] = {}
    _execute(x, 1, STEP_TABLE[0], recomputed)
    if config.embedded:
        x.index_data(Path(x.read("data")["root"]))
        _build_model(x)
    if config.progress:
        _print_plan(x)
    for i, step in enumerate(STEP_TABLE[1:], start=2):
        _execute(x, i, step, recomputed)
    write_json(x.run_dir / "run.json", _run_info(x, _threads()))  # every step's time, the report's included
    summary = _read_json(x.run_dir / REPORT_DIR / REPORT_JSON)
    return {"run_dir": str(x.run_dir), "report": summary["html"], "headline": summary["headline"],
            "export": str(x.run_dir / "export"), "choice": x.choice, "recomputed": recomputed,
            "seconds": round(time.perf_counter() - t_job, 1)}


def _threads() -> int:
    return torch.get_num_threads()


def _prepare_folder(x: FixContext) -> None:
    """--restart wipes the step results and working folders; then open (or start) ``state.json``."""
    run_dir = x.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder")
    if x.config.restart and run_dir.exists():
        for step in STEPS + ("export", "run"):
            (run_dir / f"{step}.json").unlink(missing_ok=True)
        for sub in ("train", "finetune", "export", "report"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    x.state = RunState(run_dir, restart=x.config.restart)
    done = [s for s in STEPS if x.state.record(s).get("done")]
    if done:
        x.say(f"fixres fix: resuming {run_dir} (done before: {', '.join(done)}; steps whose inputs changed are redone)")


def _setup_runtime(x: FixContext) -> None:
    """Device and precisions (a device that is not there is refused before anything is written)."""
    c = x.config
    x.env = dist.DistEnv(device=dist.resolve_device(c.device))
    x.precision = engine.precision_for(x.env.device, amp=c.amp)
    # every accuracy in the run is measured as `fixres eval` measures it (inference precision)
    x.eval_precision = engine.inference_precision(x.env.device, c.amp)


def _build_model(x: FixContext) -> None:
    """The model, built once; the sizes to sweep follow from its train size and stride."""
    torch.manual_seed(x.config.seed)  # a model built from scratch starts from the same weights every run
    x.load_model()
    c = x.config
    x.test_sizes = sorted(set(c.test_sizes or default_test_sizes(x.cfg.train_size, step=x.cfg.stride)))


def _probe_speed(x: FixContext) -> tuple[float, float]:
    """(seconds per image of a forward at T, seconds per image to read and pre-process one), measured now."""
    fwd = latency_ms(x.bundle.model, x.cfg.train_size, device=x.env.device, precision=x.eval_precision,
                     batch=PLAN_PROBE_BATCH) / 1000.0
    transform = build_transform("test", size=x.cfg.train_size, cfg=x.cfg)
    probe = x.train_index.samples[:PLAN_PROBE_IMAGES]
    t0 = time.perf_counter()
    for path, _ in probe:
        try:
            transform(load_rgb(path))
        except Exception:  # noqa: BLE001 - an unreadable probe image only makes the estimate rougher
            pass
    return fwd, (time.perf_counter() - t0) / max(1, len(probe))


def plan_estimates(x: FixContext, fwd: float, load: float) -> dict[str, float]:
    """Rough seconds per step from a forward time at T and a read time per image (printed before starting)."""
    c, t = x.config, x.cfg.train_size
    n_fit, n_hold, n_val = len(x.fit), len(x.holdout), len(x.val_index.samples)
    cands = c.candidates or ([c.test_size] if c.test_size else fixsize.candidate_sizes(t, x.cfg.stride))
    area = lambda sizes: sum((s / t) ** 2 for s in sizes)  # noqa: E731
    sweep = n_val * (load * len(x.test_sizes) + fwd * area(x.test_sizes))

    def one(size: int, epochs: int, n_scored: int) -> float:  # reading costs the same at every size
        return estimate_seconds(size, seconds_per_pixel=fwd / (t * t), read_s=load, n_fit=n_fit, n_scored=n_scored,
                                epochs=epochs, cached=c.augment == "test")
    # The grid runs at one size near the recommendation (not known yet): the middle candidate other than T.
    away = sorted(s for s in cands if s != t) or [t]
    grid = [one(away[len(away) // 2], c.finetune_epochs * f, n_hold)
            for _ in candidates.SCHEDULE_LR_FACTORS for f in candidates.SCHEDULE_EPOCH_FACTORS]
    est = {"train": c.train_epochs * n_fit * (3 * fwd + load) if x.needs_training else 0.0,
           "sweep_before": sweep, "sweep_after": sweep,
           "schedule": sum(grid) if _tunes_schedule(x) else 0.0,
           "select": 0.0 if c.label_free else sum(one(s, c.finetune_epochs, n_hold + n_val) for s in cands),
           "stats": 2 * min(STATS_IMAGES, n_val) * (load + fwd) * 4}
    return {k: v for k, v in est.items() if v > 0}


def _print_plan(x: FixContext) -> None:
    """The steps ahead with rough times; steps finished before are marked (they are reused when their
    inputs are unchanged, which only their keys, computed as the run goes, can tell)."""
    fwd, load = _probe_speed(x)
    est = plan_estimates(x, fwd, load)
    done = {k for k in est if x.state.record(k).get("done")}
    todo = sum(v for k, v in est.items() if k not in done)
    x.say(f"plan ({x.env.device}; rough estimates from a {1000 * fwd:.1f} ms/image forward at {x.cfg.train_size}px "
          f"and {1000 * load:.0f} ms/image reading): "
          + ", ".join(f"{k} " + ("done before" if k in done else f"~{format_duration(v)}") for k, v in est.items())
          + f"; total ~{format_duration(todo)}" + (" for the steps not done before" if done else ""))


def _run_info(x: FixContext, threads: int) -> dict:
    c = x.config
    return {"model": x.bundle.name, "source": x.bundle.source, "train_size": x.cfg.train_size,
            "test_size": int(x.choice["test_size"]), "test_sizes": x.test_sizes, "data": str(x.data_root),
            "choice": x.choice, "config": _strip(asdict(c), ("progress",)), "device": str(x.env.device),
            "precision": x.precision.describe(), "started": x.state.state.get("started"),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"), "timings": x.state.timings(),
            "torch_threads": threads, "n_fit": len(x.fit), "n_holdout": len(x.holdout), "schedule": x.schedule,
            "candidates": x.candidates, "label_free": c.label_free}


def _check_config(config: FixConfig) -> None:
    if config.augment not in ("test", "test2", "train"):
        raise UsageError(f"unknown fine-tuning augmentation {config.augment!r}; choose test, test2 or train")
    if config.train_augment not in ("train", "control"):
        raise UsageError(f"unknown training augmentation {config.train_augment!r}; choose train or control")
    if config.data is not None and not Path(config.data).exists():
        raise UsageError(f"data folder not found: {config.data}")
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        raise UsageError(f"checkpoint not found: {config.checkpoint}")


def _stats_sizes(train_size: int, test_size: int, test_sizes: Sequence[int]) -> list[int]:
    """Figure 3/4 sizes: half the train size, the train size, the fixed size and the largest swept."""
    half = min(test_sizes, key=lambda s: abs(s - train_size // 2))
    return [half, train_size, test_size, max(test_sizes)]


def _curve_line(sweep: dict) -> str:
    return "top-1: " + ", ".join(f"{r['test_size']}px {r['top1']:.1f}" for r in sorted(sweep["rows"],
                                                                                        key=lambda r: r["test_size"]))


def _activation_stats(model, samples, cfg, sizes, *, env, precision, batch_size, workers, grid=None,
                      reference=None) -> dict:
    """Pooled-activation CDFs per size (``fixres.stats``), on a given x grid when ``grid`` is set; KS distances
    to ``reference`` (default: this model's values at the train size, also returned in ``_pooled``)."""
    return fstats.activation_stats(model, samples, cfg, test_sizes=sizes, batch_size=batch_size, env=env,
                                   precision=precision, workers=workers, progress=False, max_images=STATS_IMAGES,
                                   grid=None if grid is None else np.asarray(grid, dtype=float),
                                   reference=reference, keep_pooled=True)


def normalize_stats(raw: dict) -> dict:
    """A ``fixres.stats.activation_stats`` result as {"sizes": {size: {"x", "cdf", "zeros", "above_2"}}},
    the shape the report reads."""
    return {"sizes": {str(row["test_size"]): {"x": row["cdf_x"], "cdf": row["cdf"], "zeros": row["frac_zero"],
                                              "above_2": row["frac_above_2"],
                                              "ks_to_reference": row.get("ks_to_reference")}
                      for row in raw["sizes"]}}
