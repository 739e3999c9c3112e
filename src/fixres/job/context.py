"""The run's context of ``fixres fix``: its config (``FixConfig``), its defaults, and what the steps share.

``FixContext`` holds the run folder and state, the indexed data with its held-out split, and the model,
built once: the model before the fix (``base``) is only ever evaluated, and every fix works on one working
copy of it (``work``), reset from it, so no third copy is ever in memory.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from fixres import config as config_vocab
from fixres.choosing.budget import CANDIDATE_HIGH, candidate_sizes
from fixres.choosing.photos import (
    HOLDOUT_FRACTION,
    HOLDOUT_METHOD,
    RULE_CROSS,
    RULE_HELD_OUT,
    RULE_SELECT_DATA,
    RULE_UNTOUCHED,
    holdout_split,
)
from fixres.choosing.serving import CHOOSE_CHEAPEST
from fixres.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CACHE_BUDGET_MB,
    DEFAULT_FINETUNE_EPOCHS,
    DEFAULT_PARTS,
    DEFAULT_SELECT_BUDGET_MIN,
    EMBEDDED_MODEL,
    EMBEDDED_TRAIN_EPOCHS,
    FIX_TRAIN_BATCH_SIZE,
    FIX_TRAIN_REPEATS,
    default_out,
)
from fixres.data.folders import (
    missing_classes_warning,
    read_class_map,
    shared_photos,
)
from fixres.errors import FixresError, UsageError
from fixres.io.checkpoint import load_state_dict
from fixres.io.results import Schedule
from fixres.io.run import FixResults
from fixres.io.served import Choice
from fixres.job.fingerprint import digest, file_digest, index_fingerprint
from fixres.job.runstate import RunState
from fixres.method.cutcache import MB, CutCache, FitCaches
from fixres.method.inputs import index_folder, index_train_val
from fixres.models.card import UNKNOWN_LICENSE
from fixres.models.export import WEIGHTS_NAME
from fixres.models.loading import ModelSpec
from fixres.models.onnxrt import TORCH

#: Default sweep: multiples of the model's stride (appendix B: other sizes suffer border and round-off
#: effects, visible as a saw-tooth in the curve) from SWEEP_LOW x T to SWEEP_HIGH x T.
SWEEP_STEP = 32


#: Images used for the activation statistics (CDFs converge long before the whole validation set).
STATS_IMAGES = 250


SWEEP_LOW = 0.5


#: Up to the largest candidate size (``CANDIDATE_HIGH``): larger sizes are never chosen, and a
#: size's forward costs its area: the sizes from 2 x T to 3 x T would cost twice all those up to 2 x T.
SWEEP_HIGH = CANDIDATE_HIGH


MAX_SWEEP_SIZE = 512


STEPS = ("data", "train", "analyze", "sweep_before", "schedule", "select", "finetune", "sweep_after", "stats",
         "robustness", "report")





@dataclass
class FixConfig:
    """Everything ``fixres fix`` needs; None means "the embedded default" or "the model's own"."""

    model: str | None = None
    checkpoint: str | None = None
    weights: str | None = None
    #: timm's or torchvision's own weights for ``model``, from their local caches
    pretrained: bool = False
    num_classes: int | None = None
    class_map: str | None = None
    data: str | None = None
    out: str = str(default_out("fix"))
    train_size: int | None = None
    test_sizes: list[int] | None = None
    test_size: int | None = None
    parts: str = ",".join(DEFAULT_PARTS)
    augment: str = "test"
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    train_epochs: int = EMBEDDED_TRAIN_EPOCHS
    train_augment: str = "train"
    train_repeats: int = FIX_TRAIN_REPEATS
    train_lr: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    train_batch_size: int = FIX_TRAIN_BATCH_SIZE
    lr: float | None = None
    crop_ratio: float | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    device: str = "auto"
    amp: bool = True
    workers: int | None = None
    seed: int = 0
    holdout_fraction: float = HOLDOUT_FRACTION
    #: a labelled folder that chooses the size (and the fine-tuning schedule) instead of the default rule
    select_data: str | None = None
    #: the user says the held-out training photos were never trained on: choose on them (a given model)
    holdout_untouched: bool = False
    # choosing the size after fixing
    candidates: list[int] | None = None
    #: what is served: the cheapest candidate not worse than the best beyond noise, or the most accurate fixed one
    choose: str = CHOOSE_CHEAPEST
    select_budget_min: float | None = DEFAULT_SELECT_BUDGET_MIN
    max_test_size: int | None = None
    budget_ms: float | None = None
    #: the runtime the candidates' latency is read on (the budget in ms and the frontier use it)
    latency_on: str = TORCH
    budget_gflops: float | None = None
    tune_schedule: bool = True
    temperature_scale: bool = False
    label_free: bool = False
    # embedded data set
    classes: int = config_vocab.DEFAULT_CLASSES
    train_per_class: int = config_vocab.DEFAULT_TRAIN_PER_CLASS
    val_per_class: int = config_vocab.DEFAULT_VAL_PER_CLASS
    stats_sizes: list[int] | None = None
    #: top-1 of the untuned and the fixed model under corruptions (noise, blur, JPEG, contrast)
    robustness: bool = True
    robustness_images: int | None = config_vocab.ROBUSTNESS_IMAGES
    restart: bool = False
    progress: bool = True
    #: what the export's model card says: the command that made it, the licence of the weights
    command: str | None = None
    license: str = UNKNOWN_LICENSE

    @property
    def embedded(self) -> bool:
        return self.data is None

    @property
    def has_weights(self) -> bool:
        return bool(self.checkpoint or self.weights or self.pretrained)

    @property
    def model_name(self) -> str | None:
        return self.model or (None if self.has_weights else EMBEDDED_MODEL)


def default_test_sizes(train_size: int, *, step: int = SWEEP_STEP) -> list[int]:
    """Multiples of ``step`` from about SWEEP_LOW to SWEEP_HIGH times the train size (always including it)."""
    lo = max(step, int(round(SWEEP_LOW * train_size / step)) * step)
    hi = min(MAX_SWEEP_SIZE, max(lo, int(round(SWEEP_HIGH * train_size / step)) * step))
    sizes = set(range(lo, hi + 1, step))
    sizes.add(train_size)
    return sorted(sizes)


def strip_private(result: dict, drop: Sequence[str] = ()) -> dict:
    """JSON-ready copy without private keys and bulky per-image arrays."""
    return {k: v for k, v in result.items() if not k.startswith("_") and k not in drop}


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
    holdout: list = field(default_factory=list)  # the photos that choose (held-out or --select-data)
    seen: list = field(default_factory=list)  # cross-selection: training photos shown for comparison only
    rule: str = ""  # which photos choose the size (CHOOSING_RULES)
    split: dict | None = None  # how a data folder without train/ and val/ was split
    fingerprints: dict = field(default_factory=dict)
    bundle: object = None
    #: the model's data config with the run's overrides, its classes and number of outputs
    data_config: object = None
    env: object = None
    precision: object = None
    eval_precision: object = None
    #: the test sizes swept before the analysis adds its candidates and recommendation
    swept_sizes: list[int] = field(default_factory=list)
    #: every step's result, as the steps run or resume
    results: FixResults = field(default_factory=FixResults)
    _base_ready: bool = False
    _work: object = None
    _holds: str = ""  # what the working copy holds: "export" (the fixed model) or a candidate
    _checkpoint_sha: str | None = None
    _cut_cache: CutCache | None = None
    _fit_caches: FitCaches | None = None
    #: the plan's measured cached fine-tuning step's share of a forward (``job.plan.Probe``), when it printed
    cached_share: float | None = None

    # ---- data
    def index_data(self, data_root: Path) -> None:
        """Index train/ and val/ (val mapped onto the training classes by name)."""
        c = self.config
        class_map = read_class_map(c.class_map) if c.class_map else None
        splits = index_train_val(data_root, class_map=class_map, num_classes=c.num_classes)
        self.train_index, self.val_index = splits.train, splits.val
        msg = missing_classes_warning(self.val_index)
        if msg:
            self.say("  warning: " + msg)
        if splits.one_folder:
            self.train_index, self.val_index = split_one_folder(self.train_index, seed=c.seed)
            self.split = {"val_share": VAL_SHARE_WITHOUT_SPLITS, "seed": c.seed, "n_train": len(self.train_index),
                          "n_val": len(self.val_index), "val_photos": [p for p, _ in self.val_index.samples]}
            self.say(f"  the data has no train/ and val/ folders: {len(self.val_index)} of its photos "
                     f"({VAL_SHARE_WITHOUT_SPLITS:.0%} of every class, seed {c.seed}) are kept for validation, never "
                     "fitted on or chosen on; the rest fine-tune")
        self.data_root = Path(data_root)
        self.fingerprints = {"train_images": index_fingerprint(self.train_index.samples),
                             "val_images": index_fingerprint(self.val_index.samples),
                             "classes": digest(list(self.train_index.classes))}

    def assign_choosing_photos(self) -> None:
        """Which photos choose the size (``CHOOSING_RULES``), once the model is known: held-out
        training photos only when this run trains the model without them (or the user vouches for them)."""
        c = self.config
        every = [(str(p), int(y)) for p, y in self.train_index.samples]
        if c.select_data:
            self.rule = RULE_SELECT_DATA
            chooser = index_folder(c.select_data, classes=self.train_index, num_classes=c.num_classes)
            refuse_shared_photos(chooser.samples, self.val_index.samples, "--select-data", "the validation photos "
                                 "reported (a size chosen on them flatters the figure that reports it)")
            refuse_shared_photos(chooser.samples, self.train_index.samples, "--select-data", "the training photos "
                                 "the fix fine-tunes on")
            self.fit, self.holdout = every, [(str(p), int(y)) for p, y in chooser.samples]
            self.fingerprints["select_images"] = index_fingerprint(chooser.samples)
        elif self.needs_training or c.holdout_untouched:
            self.rule = RULE_HELD_OUT if self.needs_training else RULE_UNTOUCHED
            self.fit, self.holdout = holdout_split(every, fraction=c.holdout_fraction, seed=c.seed)
        else:
            self.rule = RULE_CROSS
            self.fit, self.holdout = every, []
            self.seen = holdout_split(every, fraction=c.holdout_fraction, seed=c.seed)[1]

    @property
    def chooser_words(self) -> str:
        """What the choosing photos are, in a sentence."""
        if self.rule == RULE_SELECT_DATA:
            return f"photos of --select-data {self.config.select_data}"
        return HOLDOUT_METHOD

    # ---- what the steps' results decide
    @property
    def candidates(self) -> list[int]:
        """The sizes fixed and compared: given, or stride multiples around the train size and the recommendation."""
        c, an = self.config, self.results.analyze
        if an is None:
            return []
        if c.test_size:
            return [c.test_size]
        if not self.holdout and self.rule != RULE_CROSS:  # nothing to choose on: the recommendation only
            return [an.recommended_test_size]
        if c.candidates:
            return sorted(set(c.candidates))
        dc = self.data_config
        sizes = candidate_sizes(dc.train_size, dc.stride, recommended_unrounded=an.recommended_exact)
        return [s for s in sizes if s <= MAX_SWEEP_SIZE]

    @property
    def test_sizes(self) -> list[int]:
        """The sizes swept: the default or given ones, every candidate (their untuned accuracy) and the
        recommendation, once the analysis ran."""
        an = self.results.analyze
        if an is None:
            return list(self.swept_sizes)
        return sorted(set(self.swept_sizes) | set(self.candidates) | {an.recommended_test_size})

    @property
    def schedule(self) -> Schedule:
        return self.results.schedule

    @property
    def choice(self) -> Choice:
        return self.results.select.choice

    # ---- the model, built once
    @property
    def needs_training(self) -> bool:
        return not self.config.has_weights or bool(self.bundle.new_head)

    def load_model(self) -> None:
        c = self.config
        num_classes = c.num_classes or (self.train_index.num_classes if not c.checkpoint else None)
        self.bundle = ModelSpec(model=c.model_name, checkpoint=c.checkpoint, weights=c.weights,
                                pretrained=c.pretrained, num_classes=num_classes,
                                train_size=c.train_size or (None if c.has_weights
                                                            else config_vocab.EMBEDDED_TRAIN_SIZE)).load()
        cfg = self.bundle.data_config.with_overrides(crop_ratio=c.crop_ratio, interpolation=c.interpolation,
                                                     mean=c.mean, std=c.std)
        self.data_config = cfg.with_overrides(num_classes=self.train_index.num_classes,
                                      class_names=tuple(self.train_index.classes))

    def base(self):
        """The model before the fix (trained weights loaded when training ran in an earlier call)."""
        if not self._base_ready:
            if self.needs_training and "train" not in self.state.ran:
                load_weights(self.bundle.model, self.run_dir / "train" / WEIGHTS_NAME)
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
            load_weights(model, self.run_dir / "export" / WEIGHTS_NAME)
        return self._work

    def cut_cache(self) -> CutCache:
        """The activations at the fix's cut (``fixres.method.cutcache``): recorded while the model before the fix is
        evaluated on a set of photos, replayed when a fixed model is scored on the same photos at one size."""
        if self._cut_cache is None:
            self._cut_cache = CutCache.for_model(self.base(), self.config.parts, folder=self.run_dir / CUT_CACHE_DIR,
                                                 budget_mb=DEFAULT_CACHE_BUDGET_MB)
        return self._cut_cache

    def fit_caches(self) -> FitCaches:
        """The fitting photos' activations at the cut, filled by the first fine-tuning at a size and handed to the
        next ones there (``fixres.method.cutcache.FitCaches``)."""
        if self._fit_caches is None:
            self._fit_caches = FitCaches(budget_bytes=int(DEFAULT_CACHE_BUDGET_MB * MB))
        return self._fit_caches

    def close_cut_cache(self) -> None:
        """Free the recorded activations (and their files)."""
        if self._cut_cache is not None:
            self._cut_cache.close()
            self._cut_cache = None
        if self._fit_caches is not None:
            self._fit_caches.close()
            self._fit_caches = None

    def checkpoint_sha(self) -> str | None:
        if self.config.checkpoint and self._checkpoint_sha is None:
            self._checkpoint_sha = file_digest(self.config.checkpoint)
        return self._checkpoint_sha

    def eval_kw(self) -> dict:
        """How ``fix`` evaluates: every photo decoded at full size, as the export's serving transform (and a
        timm or torchvision pipeline) decodes it, so the accuracy ``fix`` prints and exports is the one a user
        reproduces; ``eval`` and ``sweep`` decode reduced by default, for speed."""
        c = self.config
        return dict(batch_size=c.batch_size, env=self.env, precision=self.eval_precision, workers=c.workers,
                    progress=c.progress, reduced_decode=FIX_REDUCED_DECODE)


#: Where the activations at the cut go when they outgrow memory (under the run folder).
CUT_CACHE_DIR = "cache/cut"
#: The photo sets the model before the fix records activations on, and the fixed models are scored on.
VAL, HOLDOUT, SEEN = "val", "holdout", "seen"
#: ``fix`` measures on fully decoded photos (see ``FixContext.eval_kw``).
FIX_REDUCED_DECODE = False
#: A data folder without train/ and val/ is split: this share of every class (seeded) is the validation set.
VAL_SHARE_WITHOUT_SPLITS = 0.2


def split_one_folder(index, *, seed: int):
    """(train, val) indexes of one folder: a seeded, class-stratified share of the photos for validation, so no
    reported photo is fitted on. Deterministic in (photos, seed): a rerun gets the same split."""
    train, val = holdout_split(index.samples, fraction=VAL_SHARE_WITHOUT_SPLITS, seed=seed)
    if not val:
        raise UsageError(f"{index.root} has no train/ and val/ folders and too few photos per class to keep some "
                         "for validation: give it train/ and val/")
    return dataclasses.replace(index, samples=train), dataclasses.replace(index, samples=val)


def refuse_shared_photos(chooser, other, flag: str, what: str) -> None:
    """One line when the photos given to choose on are (some of) ``other``: the same files, links resolved."""
    shared = shared_photos(other, chooser)
    if shared:
        raise UsageError(f"{flag} holds {len(shared)} of {what}, e.g. {shared[0]}: give a folder of other photos")


def load_weights(model, path: Path) -> None:
    """Load a state dict saved by this run into an already built model (strict)."""
    if not path.is_file():
        raise FixresError(f"{path} is missing; rerun with --restart")
    model.load_state_dict(load_state_dict(path), strict=True)


def stats_sizes_of(x: FixContext) -> list[int]:
    return sorted(set(x.config.stats_sizes or _stats_sizes(x.data_config.train_size, x.choice.test_size,
                                                           x.test_sizes)))


def tunes_schedule(x: FixContext) -> bool:
    c = x.config
    return c.tune_schedule and not c.label_free and bool(x.holdout) and c.lr is None  # never on the reported photos


def _stats_sizes(train_size: int, test_size: int, test_sizes: Sequence[int]) -> list[int]:
    """Figure 3/4 sizes: half the train size, the train size, the fixed size and the largest swept."""
    half = min(test_sizes, key=lambda s: abs(s - train_size // 2))
    return [half, train_size, test_size, max(test_sizes)]
