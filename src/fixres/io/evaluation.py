"""The result of evaluating a model on photos at several views in one pass, as a type (``fixres.method.evaluate``).

``EvalResult`` holds one ``ViewScore`` per view (a test size at a crop ratio) and per ensemble of views, the count
of photos read and skipped, how the pass ran, reliability bins and per-class top-1. Its JSON (``to_json``) is what
``fixres eval`` / ``sweep`` write and what a run's sweep files hold (``fixres.io.results.Sweep`` reads them back).
The per-photo arrays a caller asked for (outcomes for paired tests, log-probabilities for temperature scaling)
ride along in memory only: they are never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fixres.io.schema import dump, parse

#: Accuracies are in percent.
PERCENT = 100.0
#: A field kept in memory only (never read from or written to JSON).
IN_MEMORY = {"transient": True}


@dataclass(frozen=True)
class ViewScore:
    """Accuracy at one view (``test_size`` at ``crop_ratio``, its resize) or an ensemble of views (``test_sizes``,
    softmax averaged), in percent: top-1 with its binomial SE (the error bar) and fold std (the leave-one-fold-out
    std of the paper's section 5), top-5, loss (= NLL, mean cross-entropy), ECE, on ``n`` photos of which
    ``correct`` were right; with temperature scaling, the fitted temperature and the scaled NLL and ECE."""

    top1: float
    n: int = 0
    test_size: int | None = None
    crop_ratio: float | None = None
    resize: int | None = None
    ten_crop: bool = False
    test_sizes: tuple[int, ...] | None = None
    crop_ratios: tuple[float, ...] | None = None
    top1_se: float | None = None
    top1_std: float | None = None
    top5: float | None = None
    top5_se: float | None = None
    top5_std: float | None = None
    loss: float | None = None
    nll: float | None = None
    ece: float | None = None
    correct: int | None = None
    correct5: int | None = None
    temperature: float | None = None
    nll_scaled: float | None = None
    ece_scaled: float | None = None

    @property
    def se(self) -> float | None:
        """The error bar: the binomial standard error (from top-1 and n where a file lacks it)."""
        return self.top1_se if self.top1_se is not None else binomial_se_of(self.top1, self.n)

    def __repr__(self) -> str:
        where = f"{self.test_size}px" if self.test_sizes is None else "+".join(map(str, self.test_sizes)) + "px"
        se = self.se
        return f"{type(self).__name__}({where}: top-1 {self.top1:.1f}{'' if se is None else f' ± {se:.1f} (SE)'} " \
               f"on {self.n} images)"

    @property
    def label(self) -> str:
        """The view's key in the per-view maps (reliability, per-class top-1, per-photo arrays): '224@0.875', or
        '384@0.875+352@0.875' for an ensemble."""
        if self.test_sizes is not None:
            return "+".join(f"{s}@{c:g}" for s, c in zip(self.test_sizes, self.crop_ratios or (), strict=True))
        return f"{self.test_size}@{self.crop_ratio:g}"


def binomial_se_of(top1: float | None, n: int | float | None) -> float | None:
    """The binomial standard error (points) of a top-1 (percent) on ``n`` photos; None without both."""
    if top1 is None or not n:
        return None
    p = top1 / PERCENT
    return PERCENT * max(p * (1 - p) / n, 0.0) ** 0.5


@dataclass(frozen=True)
class Reliability:
    """Confidence against accuracy in bins (a reliability diagram): per bin its mean confidence, accuracy and count
    (None for an empty bin), between ``edges``."""

    confidence: tuple[float | None, ...] = ()
    accuracy: tuple[float | None, ...] = ()
    count: tuple[int | None, ...] = ()
    edges: tuple[float, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A file that could not be read, and why."""

    path: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PerClass:
    """Top-1 per class for each view (by its label), with each class's photo count."""

    classes: tuple[str, ...] = ()
    n: tuple[int, ...] = ()
    top1: dict[str, tuple[float | None, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class FittedOn:
    """The held-out photos a temperature was fitted on."""

    n_images: int | None = None
    data: str | None = None


@dataclass(frozen=True)
class PhotoArrays:
    """Per-photo arrays of one pass, in the data set's order with skipped photos left out: each photo's index in
    the samples, and per view (by label) whether it was right (``hits``) and its log-probabilities."""

    idx: np.ndarray | None = None
    hits: dict[str, np.ndarray] | None = None
    log_probs: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None


@dataclass(frozen=True)
class EvalResult:
    """A model on photos at every view in one pass (see the module)."""

    rows: tuple[ViewScore, ...] = ()
    ensembles: tuple[ViewScore, ...] = ()
    n_images: int = 0
    n_samples: int | None = None
    skipped: tuple[Skipped, ...] = ()
    folds: int | None = None
    num_outputs: int | None = None
    precision: str | None = None
    fp32_fallback_batches: int | None = None
    device: str | None = None
    world_size: int | None = None
    backend: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    seconds: float = 0.0
    images_per_s: float | None = None
    #: {view label: bins}
    reliability: dict[str, Reliability] = field(default_factory=dict)
    per_class: PerClass | None = None
    temperature_fitted_on: FittedOn | None = None
    arrays: PhotoArrays = field(default=PhotoArrays(), repr=False, compare=False, metadata=IN_MEMORY)

    def __post_init__(self) -> None:
        # a row is a view: one without a test size (a damaged file's) cannot be placed on a curve
        object.__setattr__(self, "rows", tuple(r for r in self.rows if r.test_size is not None))

    @classmethod
    def from_json(cls, doc: dict):
        return parse(cls, doc)

    def to_json(self) -> dict:
        """The JSON a command writes: every field of the pass (None as null), each row with what was measured at
        it; per-class top-1 and the temperature's held-out photos only where they were asked for."""
        doc = dump(self)
        doc["rows"] = [dump(r, omit_none=True) for r in self.rows]
        doc["ensembles"] = [dump(r, omit_none=True) for r in self.ensembles]
        for optional in ("per_class", "temperature_fitted_on"):
            if doc[optional] is None:
                del doc[optional]
        return doc

    def at(self, test_size: int | None) -> ViewScore | None:
        """The row at ``test_size`` (the first crop measured there); None when it was not measured."""
        return None if test_size is None else next((r for r in self.rows if r.test_size == int(test_size)), None)

    @property
    def sizes(self) -> list[int]:
        return [r.test_size for r in self.rows]

    def reliability_at(self, test_size: int | None) -> Reliability | None:
        return next((r for k, r in self.reliability.items() if k.split("@")[0] == str(test_size)), None)

    def hits_at(self, row: ViewScore) -> np.ndarray:
        """Whether each photo was right at ``row``'s view (kept with ``keep_outcomes``)."""
        return self.arrays.hits[row.label]

    def with_rows(self, rows, ensembles=None, **fields) -> "EvalResult":
        return replace(self, rows=tuple(rows), ensembles=self.ensembles if ensembles is None else tuple(ensembles),
                       **fields)
