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
from dataclasses import dataclass, field
from pathlib import Path

from fixres.io.evaluation import EvalResult
from fixres.io.schema import KeptDocument, SchemaError, dump, parse

#: Every step file a run folder may hold, in the order of the steps (``grid`` is the train x test grid's).
STEP_FILES = ("run", "data", "train", "analyze", "sweep_before", "schedule", "select", "finetune", "export",
              "sweep_after", "stats", "robustness", "grid")


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
class MonteCarlo:
    """The apparent-size ratio sampled on the photos' own sizes."""

    mean: float | None = None
    recommended_test_size: int | None = None
    recommended_test_size_exact: float | None = None


@dataclass(frozen=True)
class AnalysisDocument:
    """analyze.json as the report reads it: every field may be missing or broken."""

    ratio: float | None = None
    recommended_test_size: int | None = None
    recommended_test_size_exact: float | None = None
    train_augment: str = "train"
    crop_ratio: float | None = None
    #: [width, height] per photo (a photo whose size is not two numbers is left out)
    image_sizes: tuple[tuple[float, ...], ...] = ()
    monte_carlo: MonteCarlo | None = None


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
        an = parse(AnalysisDocument, doc)
        if an.ratio is None or an.recommended_test_size is None:
            raise SchemaError("analyze.json: no ratio or recommended test size")
        mc = an.monte_carlo or MonteCarlo()
        exact = mc.recommended_test_size_exact or an.recommended_test_size_exact or an.recommended_test_size
        return cls(ratio=an.ratio, recommended_test_size=an.recommended_test_size, recommended_exact=exact,
                   train_augment=an.train_augment, sampled_ratio=mc.mean, document=doc)

    def to_json(self) -> dict:
        return self.document


# --------------------------------------------------------------------------- a sweep over test sizes

@dataclass(frozen=True)
class Sweep(KeptDocument, EvalResult):
    """A model at every swept test size on the validation photos (``fixres.method.evaluate``'s result), with every
    photo's outcome per size, and what the curve is (after the fix: each size fixed at its own, or the export)."""

    #: {size: per-photo outcomes as text} (``fixres.choosing.outcomes``); empty when not kept
    outcomes: dict[str, str] = field(default_factory=dict)
    #: what the curve after the fix is (``fixres.report.page.AFTER_EACH_FIXED`` / ``AFTER_EXPORTED``)
    after: str | None = None


# --------------------------------------------------------------------------- the fine-tuning schedule

@dataclass(frozen=True)
class Schedule:
    """The fine-tuning rate (None: the default for the batch size) and epochs, and how they were chosen."""

    lr: float | None
    epochs: int
    how: str
    #: schedule.json when the grid ran (its rows), else None
    document: dict | None = field(default=None, repr=False, compare=False, metadata={"transient": True})

    @classmethod
    def from_json(cls, doc: dict) -> "Schedule":
        return parse(cls, doc, document=doc)

    def to_json(self) -> dict:
        return self.document if self.document is not None else {"lr": self.lr, "epochs": self.epochs,
                                                                  "how": self.how}


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
        out = dump(self)
        if self.headline_rule is None:
            for key in self.CROSS_ONLY:
                out.pop(key)
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "Headline":
        return parse(cls, doc)
