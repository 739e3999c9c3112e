"""The results of a ``fixres fix`` run as types, and their JSON: one schema for every step's file.

Each step of the run returns one of these (or, where only the report reads it, the JSON document it
writes); ``FixResults`` holds them as they flow from step to step. ``to_json`` is what the step writes to
``RUN_DIR/<step>.json``; ``from_json`` reads it back, which happens only when a run resumes (a finished
step is not recomputed) and when ``fixres report`` rebuilds a page from a run folder (``read_documents``).
Readers of a document written by hand or damaged treat a field that is not a finite number as missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

#: Every step file a run folder may hold, in the order of the steps (``grid`` is the train x test grid's).
STEP_FILES = ("run", "data", "train", "analyze", "sweep_before", "schedule", "select", "finetune", "export",
              "sweep_after", "stats", "robustness", "grid")
#: What is served: the model fixed at a size, or the model as trained evaluated at a size.
FIXED, UNTUNED = "fixed", "untuned"


def number(v) -> float | None:
    """``v`` as a finite float, or None for anything else (a missing, broken or hostile field)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def read_document(path: Path) -> dict | None:
    """A step's JSON document, or None when the file is missing or is not a JSON object."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_documents(run_dir: Path) -> dict[str, dict]:
    """Every step document present in ``run_dir``, by step name (``fixres report`` rebuilds a page from them)."""
    docs = {name: read_document(run_dir / f"{name}.json") for name in STEP_FILES}
    return {k: v for k, v in docs.items() if v is not None}


# --------------------------------------------------------------------------- the analysis (eq. 5)

@dataclass(frozen=True)
class Analysis:
    """Apparent object size at test relative to training on this data's photos, and the test size it implies."""

    ratio: float
    recommended_test_size: int
    #: the unrounded recommendation (sampled on the photos where they were, else the closed form)
    recommended_exact: float
    train_augment: str
    #: the ratio sampled on these photos' sizes (None without photo sizes)
    sampled_ratio: float | None
    #: analyze.json as written: the photo sizes, the sampled histogram and the closed form, for the report
    document: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: dict) -> "Analysis":
        mc = doc.get("monte_carlo") or {}
        exact = mc.get("recommended_test_size_exact") or doc.get("recommended_test_size_exact")
        return cls(ratio=float(doc["ratio"]), recommended_test_size=int(doc["recommended_test_size"]),
                   recommended_exact=float(exact or doc["recommended_test_size"]),
                   train_augment=str(doc.get("train_augment", "train")), sampled_ratio=number(mc.get("mean")),
                   document=doc)

    def to_json(self) -> dict:
        return self.document


# --------------------------------------------------------------------------- a sweep over test sizes

@dataclass(frozen=True)
class SweepRow:
    """Top-1 at one test size (percent) on ``n`` photos, its fold std, NLL and ECE."""

    test_size: int
    top1: float
    top1_std: float | None
    n: int
    nll: float | None = None
    ece: float | None = None

    @classmethod
    def from_json(cls, row: dict) -> "SweepRow":
        return cls(test_size=int(row["test_size"]), top1=float(row["top1"]), top1_std=number(row.get("top1_std")),
                   n=int(row.get("n") or 0), nll=number(row.get("nll")), ece=number(row.get("ece")))


@dataclass(frozen=True)
class Sweep:
    """A model at every swept test size on the validation photos, and every photo's outcome per size."""

    rows: tuple[SweepRow, ...]
    n_images: int
    seconds: float
    #: {size: per-photo outcomes as text} (``fixres.choosing.outcomes``); empty when not kept
    outcomes: dict[str, str]
    document: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: dict) -> "Sweep":
        return cls(rows=tuple(SweepRow.from_json(r) for r in doc.get("rows") or ()),
                   n_images=int(doc.get("n_images") or 0), seconds=float(doc.get("seconds") or 0.0),
                   outcomes=dict(doc.get("outcomes") or {}), document=doc)

    def to_json(self) -> dict:
        return self.document

    def at(self, test_size: int) -> SweepRow | None:
        return next((r for r in self.rows if r.test_size == int(test_size)), None)

    @property
    def sizes(self) -> list[int]:
        return [r.test_size for r in self.rows]


# --------------------------------------------------------------------------- the fine-tuning schedule

@dataclass(frozen=True)
class Schedule:
    """The fine-tuning rate (None: the default for the batch size) and epochs, and how they were chosen."""

    lr: float | None
    epochs: int
    how: str
    #: schedule.json when the grid ran (its rows), else None
    document: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: dict) -> "Schedule":
        return cls(lr=number(doc.get("lr")), epochs=int(doc["epochs"]), how=str(doc["how"]), document=doc)

    def to_json(self) -> dict:
        return self.document if self.document is not None else {"lr": self.lr, "epochs": self.epochs,
                                                                  "how": self.how}


# --------------------------------------------------------------------------- what is served

@dataclass(frozen=True)
class Choice:
    """The size served and what is served at it (the model fixed there, or as trained), and why."""

    test_size: int
    #: FIXED or UNTUNED; None for a label-free adaptation (always the adapted model)
    kind: str | None
    method: str
    reason: str
    chosen_on: str
    recommended: int
    n_images: int
    why_not_recommended: str | None = None
    #: the sentence on what is served and why (``fixres.choosing.serving.served_sentence``)
    served: str | None = None
    choose: str | None = None
    rule: str | None = None
    rule_text: str | None = None
    best_fixed_size: int | None = None
    best: str | None = None
    as_good: tuple[str, ...] = ()
    p_vs_best: float | None = None
    cost_key: str | None = None
    alpha: float | None = None
    #: two-fold cross-selection on the validation photos: each half's choice, the pooled top-1 and paired tests
    cross: dict | None = None
    #: the served model against the untuned one on validation photos that did not choose (paired tests)
    paired_val: dict | None = None
    #: under cross-selection, what choosing on the training photos would have shown
    seen_check: dict | None = None

    @property
    def untuned(self) -> bool:
        return self.kind == UNTUNED

    @classmethod
    def from_json(cls, doc: dict) -> "Choice":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["as_good"] = tuple(values.get("as_good") or ())
        return cls(**values)

    def to_json(self) -> dict:
        out = asdict(self)
        out["as_good"] = list(self.as_good)
        return out


@dataclass(frozen=True)
class Candidates:
    """Every candidate size fixed at its own size, scored and costed (select.json; None when the size needs no
    choosing: label-free), and the choice made on them."""

    document: dict | None
    choice: Choice

    def to_json(self) -> dict | None:
        return self.document


# --------------------------------------------------------------------------- robustness under corruptions

#: The uncorrupted photos' row of a robustness table.
CLEAN = "clean"


def _dicts(v) -> list[dict]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def _text(v) -> str | None:
    return v if isinstance(v, str) else None


def _count(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class PairedTest:
    """Column ``a`` against column ``b`` under one corruption: photos each got right more often, the exact test's
    p, Holm-adjusted ``p_holm`` (None in a result written before the correction), the difference in points."""

    corruption: str
    a: str
    b: str
    only_a: int | None
    only_b: int | None
    p: float | None
    p_holm: float | None
    difference: float | None

    @property
    def judged_p(self) -> float | None:
        """The p a verdict reads: Holm-adjusted where the result has it, else the raw p."""
        return self.p_holm if self.p_holm is not None else self.p


@dataclass(frozen=True)
class RobustnessTable:
    """Top-1 under corruptions per column (``fixres.method.robustness.corruption_table``: robustness.json of a run,
    corruptions.json of ``fixres eval --corruptions``), read defensively: a field that is not what the schema says
    is missing, and a test without a corruption, both columns or a p is left out."""

    columns: tuple[str, ...]
    #: {"corruption", "severity", column: top-1} per corruption and severity; ``mean``: per corruption
    rows: tuple[dict, ...]
    mean: tuple[dict, ...]
    paired: tuple[PairedTest, ...]
    n_images: float | None
    seed: object
    seconds: float | None
    severities: tuple | None

    @classmethod
    def from_json(cls, doc) -> "RobustnessTable":
        doc = doc if isinstance(doc, dict) else {}
        cols = doc.get("columns")
        tests = tuple(PairedTest(corruption=t["corruption"], a=t["a"], b=t["b"], only_a=_count(t.get("only_a")),
                                 only_b=_count(t.get("only_b")), p=number(t.get("p")),
                                 p_holm=number(t.get("p_holm")), difference=number(t.get("difference")))
                      for t in _dicts(doc.get("paired"))
                      if all(_text(t.get(k)) is not None for k in ("corruption", "a", "b")))
        severities = doc.get("severities")
        return cls(columns=tuple(c for c in cols if isinstance(c, str)) if isinstance(cols, list) else (),
                   rows=tuple(_dicts(doc.get("rows"))), mean=tuple(_dicts(doc.get("mean"))), paired=tests,
                   n_images=number(doc.get("n_images")), seed=doc.get("seed"), seconds=number(doc.get("seconds")),
                   severities=tuple(severities) if isinstance(severities, list) else None)

    @property
    def corrected(self) -> bool:
        return any(t.p_holm is not None for t in self.paired)


# --------------------------------------------------------------------------- the headline

@dataclass(frozen=True)
class Headline:
    """The run's numbers in one place: top-1 at the train size, at the best untuned size (optimistic: the best
    of every swept size on these photos), untuned at the served size, fixed there, and what is served with its
    unbiased top-1 (cross-selected, or on validation photos that did not choose). ``*_se``: binomial standard
    error; ``*_std``: the fold std of the paper's section 5."""

    model: str | None
    train_size: int | None
    test_size: int | None
    recommended_test_size: int | None
    top1_at_train_size: float | None
    top1_at_train_size_std: float | None
    top1_at_train_size_se: float | None
    best_untuned_test_size: int | None
    top1_best_untuned: float | None
    top1_best_untuned_std: float | None
    top1_best_untuned_se: float | None
    top1_untuned_at_test_size: float | None
    top1_untuned_at_test_size_std: float | None
    top1_untuned_at_test_size_se: float | None
    top1_fixed: float | None
    top1_fixed_std: float | None
    top1_fixed_se: float | None
    n_val: int | None
    seconds_total: float
    timings: dict
    served_kind: str
    served: str | None
    top1_served: float | None
    top1_served_se: float | None
    n_swept_sizes: int
    best_untuned_optimistic: bool = True
    #: under cross-selection: the pooled rule, the exported size's top-1 on all validation photos (optimistic)
    #: and the untuned model at the same cross-selected sizes
    headline_rule: str | None = None
    top1_fixed_all_val: float | None = None
    top1_untuned_same_choice: float | None = None

    CROSS_ONLY = ("headline_rule", "top1_fixed_all_val", "top1_untuned_same_choice")

    def to_json(self) -> dict:
        out = asdict(self)
        if self.headline_rule is None:
            for key in self.CROSS_ONLY:
                out.pop(key)
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "Headline":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


# --------------------------------------------------------------------------- the run

@dataclass
class FixResults:
    """Every step's result of one run, filled as the steps run (or, resuming, as their files are read)."""

    data: dict | None = None
    train: dict | None = None
    analyze: Analysis | None = None
    sweep_before: Sweep | None = None
    schedule: Schedule | None = None
    select: Candidates | None = None
    finetune: dict | None = None
    #: export.json: where the fixed model was written
    export: dict | None = None
    sweep_after: Sweep | None = None
    stats: dict | None = None
    robustness: dict | None = None
    headline: Headline | None = None
    report: dict | None = None

    def documents(self) -> dict[str, dict]:
        """The step results present, as the JSON documents their files hold, by step name."""
        out = {}
        for name in STEP_FILES:
            value = getattr(self, name, None)
            doc = value if isinstance(value, dict) or value is None else value.to_json()
            if doc is not None:
                out[name] = doc
        return out


@dataclass(frozen=True)
class FixRun:
    """What ``fixres fix`` produced: what is served at which size and why, the headline numbers, where the files
    are, which steps were recomputed because their inputs changed ({step: [changed inputs]}), and every step's
    result."""

    run_dir: Path
    report: Path
    export: Path
    test_size: int
    headline: Headline
    choice: Choice
    recomputed: dict = field(default_factory=dict)
    seconds: float = 0.0
    results: FixResults | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "report": str(self.report), "export": str(self.export),
                "test_size": self.test_size, "headline": self.headline.to_json(), "choice": self.choice.to_json(),
                "recomputed": self.recomputed, "seconds": self.seconds}
