"""The documents of a ``fixres fix`` run folder that its report reads, as types: the run's summary (run.json), the
data (data.json), training and fine-tuning records (train.json, finetune.json), pooled-activation statistics
(stats.json), the train x test grid (grid.json), the export (export.json), the choice's candidates (select.json)
and top-1 under corruptions (robustness.json, also ``fixres eval --corruptions``'s corruptions.json).

``RunDocuments.of`` reads every step document present once (``fixres.io.schema.parse``): a field that is missing
or not what its type says reads as missing, so the report shows a broken number as n/a (or leaves the figure
out) instead of stopping or printing a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fixres.io.results import AnalysisDocument, Headline, Schedule, Sweep
from fixres.io.schema import KeptDocument, parse, parse_or_none
from fixres.io.served import CandidateTable, Choice


@dataclass(frozen=True)
class MeanStd:
    """A timing over repeats: its mean and standard deviation."""

    mean: float | None = None
    std: float | None = None


#: A time per batch in a record: one number, or its mean and std over the batches.
Timing = float | MeanStd | None


@dataclass(frozen=True)
class RunInfo:
    """run.json: the run's model, sizes, data, what was chosen and how long each step took."""

    model: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    data: str | None = None
    started: str | None = None
    finished: str | None = None
    #: {step: wall seconds}; a value that is not a number is kept as its text, for the cost table to show
    timings: dict[str, float | str] = field(default_factory=dict)
    choice: Choice | None = None
    schedule: Schedule | None = None

    @property
    def total_seconds(self) -> float:
        return float(sum(v for v in self.timings.values() if isinstance(v, float)))


@dataclass(frozen=True)
class Manifest:
    classes: tuple[str | int, ...] = ()


@dataclass(frozen=True)
class DataInfo(KeptDocument):
    """data.json: where the photos are and their classes."""

    root: str | None = None
    classes: tuple[str | int, ...] = ()
    manifest: Manifest | None = None

    @property
    def class_names(self) -> list[str]:
        return [str(n) for n in self.classes or (self.manifest.classes if self.manifest else ())]


@dataclass(frozen=True)
class TrainHparams:
    batch_size: int | None = None
    augment: str | None = None


@dataclass(frozen=True)
class TrainInfo(KeptDocument):
    """train.json: how the model was trained and what a batch cost."""

    #: one record per epoch (or their number)
    epochs: tuple[object, ...] | int | None = None
    train_size: int | None = None
    batch_size: int | None = None
    hparams: TrainHparams = TrainHparams()
    forward_ms: Timing = None
    backward_ms: Timing = None
    wall_s: float | None = None

    @property
    def n_epochs(self) -> int | None:
        return len(self.epochs) if isinstance(self.epochs, tuple) else self.epochs


@dataclass(frozen=True)
class FinetuneTiming:
    ms_per_batch_forward: Timing = None
    ms_per_batch_backward: Timing = None
    wall_s: float | None = None


@dataclass(frozen=True)
class CacheUse:
    used: bool = False


@dataclass(frozen=True)
class FinetuneInfo(KeptDocument):
    """finetune.json: what the fix fine-tuned, at which size, and what a batch cost."""

    test_size: int | None = None
    parts: tuple[str, ...] = ("classifier", "bn")
    augment: str = "test"
    epochs: int | None = None
    batch_size: int | None = None
    cache: CacheUse | bool | None = None
    timing: FinetuneTiming = FinetuneTiming()
    forward_ms: Timing = None
    backward_ms: Timing = None

    @property
    def cached(self) -> bool:
        return self.cache.used if isinstance(self.cache, CacheUse) else bool(self.cache)


@dataclass(frozen=True)
class SizeStats:
    """Pooled activations at one test size: their CDF (x, cdf), fractions at zero and above 2, and the
    Kolmogorov-Smirnov distance to those at the train size."""

    x: tuple[object, ...] = ()
    cdf: tuple[object, ...] = ()
    zeros: float | None = None
    above_2: float | None = None
    ks_to_reference: float | None = None


@dataclass(frozen=True)
class StatsBlock:
    #: {size: statistics}
    sizes: dict[str, SizeStats] = field(default_factory=dict)

    def items(self) -> list[tuple[int, SizeStats]]:
        """(size, statistics) sorted by size, leaving out keys that are not whole numbers."""
        return sorted(((int(k), v) for k, v in self.sizes.items() if k.isdigit()), key=lambda kv: kv[0])


@dataclass(frozen=True)
class StatsInfo(KeptDocument):
    """stats.json: the pooled activations before and after the fix."""

    before: StatsBlock | None = None
    after: StatsBlock | None = None


@dataclass(frozen=True)
class Grid:
    """grid.json: top-1 (percent) per test size (rows) and train size (columns), without and with the fix."""

    train_sizes: tuple[int, ...] = ()
    test_sizes: tuple[int, ...] = ()
    top1: tuple[tuple[float | None, ...], ...] | None = None
    top1_fixed: tuple[tuple[float | None, ...], ...] | None = None
    top1_std: tuple[tuple[float | None, ...], ...] | None = None
    n: float | None = None
    source: str | None = None
    control: Grid | None = None

    def complete(self, matrix) -> bool:
        """Whether ``matrix`` has a cell (a number or empty) for every test size and train size."""
        return bool(self.train_sizes) and matrix is not None and len(matrix) == len(self.test_sizes) and all(
            len(row) == len(self.train_sizes) for row in matrix)


@dataclass(frozen=True)
class ExportInfo:
    path: str | None = None


#: The uncorrupted photos' row of a robustness table.
CLEAN = "clean"


@dataclass(frozen=True)
class PairedTest:
    """Column ``a`` against column ``b`` under one corruption: photos each got right more often, the exact test's
    p, Holm-adjusted ``p_holm`` (None in a result written before the correction), the difference in points."""

    corruption: str
    a: str
    b: str
    only_a: int | None = None
    only_b: int | None = None
    p: float | None = None
    p_holm: float | None = None
    difference: float | None = None

    @property
    def judged_p(self) -> float | None:
        """The p a verdict reads: Holm-adjusted where the result has it, else the raw p."""
        return self.p_holm if self.p_holm is not None else self.p


@dataclass(frozen=True)
class RobustnessTable(KeptDocument):
    """Top-1 under corruptions per column (``fixres.method.robustness.corruption_table``: robustness.json of a run,
    corruptions.json of ``fixres eval --corruptions``), read defensively: a field that is not what the schema says
    is missing, and a test without a corruption, both columns or a p is left out."""

    columns: tuple[str, ...] = ()
    #: {"corruption", "severity", column: top-1} per corruption and severity; ``mean``: per corruption
    rows: tuple[dict, ...] = ()
    mean: tuple[dict, ...] = ()
    paired: tuple[PairedTest, ...] = ()
    n_images: float | None = None
    seed: object = None
    seconds: float | None = None
    severities: tuple[object, ...] | None = None

    @classmethod
    def from_json(cls, doc) -> "RobustnessTable":
        return parse(cls, doc, document=doc) if isinstance(doc, dict) else cls()

    @property
    def corrected(self) -> bool:
        return any(t.p_holm is not None for t in self.paired)


@dataclass(frozen=True)
class ReportInfo(KeptDocument):
    """report/report.json: the page, its figures, and the headline it renders."""

    html: str | None = None
    figures: dict[str, str] = field(default_factory=dict)
    headline: Headline | None = None


@dataclass(frozen=True)
class RunDocuments:
    """Every document of a run folder the report reads, each parsed once (None where absent or unreadable)."""

    run: RunInfo = RunInfo()
    data: DataInfo = DataInfo()
    train: TrainInfo | None = None
    analyze: AnalysisDocument | None = None
    sweep_before: Sweep | None = None
    select: CandidateTable | None = None
    finetune: FinetuneInfo | None = None
    export: ExportInfo | None = None
    sweep_after: Sweep | None = None
    stats: StatsInfo | None = None
    robustness: RobustnessTable | None = None
    grid: Grid | None = None

    @classmethod
    def of(cls, documents: dict) -> "RunDocuments":
        """The documents ``documents`` ({step: JSON object}) as types."""
        types = {"run": RunInfo, "data": DataInfo, "train": TrainInfo, "analyze": AnalysisDocument,
                 "select": CandidateTable, "finetune": FinetuneInfo, "export": ExportInfo, "stats": StatsInfo,
                 "grid": Grid}
        read = {name: parse_or_none(t, documents[name]) for name, t in types.items() if name in documents}
        read |= {name: Sweep.from_json(documents[name]) for name in ("sweep_before", "sweep_after")
                 if isinstance(documents.get(name), dict)}
        if "robustness" in documents:
            read["robustness"] = RobustnessTable.from_json(documents["robustness"])
        return cls(**{k: v for k, v in read.items() if v is not None})
