"""What ``fixres fix`` serves and why, as types: the choice (the size, fixed or as trained, the rule, the noise
around it: cross-selection, paired tests, the training-photo check) and the candidate sizes it was made among
(select.json). Read and written through ``fixres.io.schema``, as every step result is (``fixres.io.results``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fixres.io.evaluation import Reliability, ViewScore
from fixres.io.schema import dump, parse

#: What is served: the model fixed at a size, or the model as trained evaluated at a size.
FIXED, UNTUNED = "fixed", "untuned"


@dataclass(frozen=True)
class Paired:
    """An exact paired test of model a against model b on the same photos: photos only a got right, only b, p."""

    only_a: int | None = None
    only_b: int | None = None
    p: float | None = None


@dataclass(frozen=True)
class PairedOnVal:
    """The served model against the untuned one at the same size and at the train size, photo by photo."""

    untuned_top1: float | None = None
    paired_vs_untuned: Paired | None = None
    train_size_top1: float | None = None
    paired_vs_train_size: Paired | None = None


@dataclass(frozen=True)
class CrossSelection(PairedOnVal):
    """Two-fold cross-selection on the validation photos: what each half chose, every photo scored by the other
    half's choice (pooled top-1 on ``n`` photos, its SE and fold std), and the paired tests on the same photos."""

    top1: float | None = None
    n: int | None = None
    top1_se: float | None = None
    top1_std: float | None = None
    half_a: str | None = None
    half_b: str | None = None
    size_half_a: int | None = None
    size_half_b: int | None = None
    n_half_a: int | None = None
    n_half_b: int | None = None


@dataclass(frozen=True)
class SeenCheck:
    """What choosing on the training photos would have shown: their top-1 at the train size beside val's, and
    the size they would have chosen."""

    n: int | None = None
    size_chosen_on_seen: int | None = None
    seen_top1_at_train_size: float | None = None
    val_top1_at_train_size: float | None = None


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
    cross: CrossSelection | None = None
    #: the served model against the untuned one on validation photos that did not choose (paired tests)
    paired_val: PairedOnVal | None = None
    #: under cross-selection, what choosing on the training photos would have shown
    seen_check: SeenCheck | None = None

    @property
    def untuned(self) -> bool:
        return self.kind == UNTUNED

    @classmethod
    def from_json(cls, doc: dict) -> "Choice":
        return parse(cls, doc)

    def to_json(self) -> dict:
        return dump(self)


@dataclass(frozen=True)
class Score:
    """A model's top-1 (percent) on a set of photos, with its fold std, NLL, ECE and the number of photos."""

    top1: float | None = None
    top1_std: float | None = None
    nll: float | None = None
    ece: float | None = None
    n: int | None = None
    #: on the validation photos after the fix: the whole evaluation row and its reliability bins
    row: ViewScore | None = None
    reliability: Reliability | None = None


@dataclass(frozen=True)
class CandidateRow:
    """One candidate size of the choice: scored before and after its own fix, on val and the held-out photos,
    and its cost (ms per photo at batch 1 and batch N, GFLOPs; ``ms_overlaps``: within timing noise of a
    neighbour). ``latency_on``: the runtime the ms were read on when not PyTorch (then PyTorch's are ``ms_torch``)."""

    test_size: int
    val_before: Score = Score()
    val_after: Score = Score()
    holdout_after: Score | None = None
    seen_after: Score | None = None
    ms: float | None = None
    ms_batch: float | None = None
    gflops: float | None = None
    ms_overlaps: bool = False
    latency_on: str | None = None
    ms_torch: float | None = None

    @property
    def held_out(self) -> Score:
        return self.holdout_after or self.seen_after or Score()


@dataclass(frozen=True)
class CandidateTable:
    """select.json: every candidate size fixed at its own size (a candidate without a whole-number size is left
    out), the sizes dropped to fit the time budget, and how many training photos were scored."""

    candidates: tuple[CandidateRow, ...] = ()
    dropped: tuple[int, ...] = ()
    n_seen: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(c for c in self.candidates if c.test_size > 0))

    def at(self, size: int | None) -> CandidateRow | None:
        return next((c for c in self.candidates if c.test_size == size), None)



@dataclass(frozen=True)
class Candidates:
    """Every candidate size fixed at its own size, scored and costed (select.json; None when the size needs no
    choosing: label-free), and the choice made on them."""

    document: dict | None
    choice: Choice

    def to_json(self) -> dict | None:
        return self.document

    @property
    def table(self) -> CandidateTable | None:
        """The candidates as read from the document (None without one)."""
        return None if self.document is None else parse(CandidateTable, self.document)
