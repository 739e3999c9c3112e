"""Choosing the test size to fix at, without looking at the images the result is reported on.

The size is chosen on a *held-out part of the training data* (``holdout_split``: a stratified,
seeded share of every class), never on the validation images the headline reports: choosing on
the reported images flatters the result by the selection's own noise. Candidates are the
multiples of the network stride around the train size plus the neighbours of the apparent-size
recommendation (``candidate_sizes``). ``choose_within_budget`` picks the most accurate size whose
deployment cost (size, ms per image, GFLOPs) fits a budget. Pure functions: no torch, no I/O.
"""

from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

from fixres.errors import UsageError
from fixres.method.selection import best_row

#: Share of every training class held out to choose the test size (never fitted, never reported).
HOLDOUT_FRACTION = 0.2
#: A class needs at least this many training images before one of them is held out.
MIN_CLASS_IMAGES_FOR_HOLDOUT = 2
#: Default candidates for selection after fixing: stride multiples from CANDIDATE_LOW x T to CANDIDATE_HIGH x T.
CANDIDATE_LOW = 0.5
CANDIDATE_HIGH = 2.0
HOLDOUT_METHOD = "held-out training images"


def holdout_split(samples: Sequence[Sequence], *, fraction: float = HOLDOUT_FRACTION, seed: int = 0
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(fit, held_out): ``fraction`` of each class's images (at least one when the class has two), seeded.

    Both lists keep the input order; together they are exactly the input.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(int(label), []).append(i)
    held: set[int] = set()
    rng = random.Random(seed)
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < MIN_CLASS_IMAGES_FOR_HOLDOUT:
            continue
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        held.update(rng.sample(idx, k))
    fit = [(str(p), int(y)) for i, (p, y) in enumerate(samples) if i not in held]
    out = [(str(p), int(y)) for i, (p, y) in enumerate(samples) if i in held]
    return fit, out


def choose_test_size(*, recommended: int, sweep_rows: Sequence[Mapping], train_size: int) -> dict:
    """Before fixing: max(recommended, best untuned on the rows given), both measured; the choice and why."""
    best = best_row(sweep_rows, train_size=train_size)
    best_size = int(best["test_size"]) if best else train_size
    chosen = max(int(recommended), best_size)
    reason = ("the apparent-size recommendation" if chosen == int(recommended) and chosen != best_size else
              "the best untuned test size" if chosen == best_size and chosen != int(recommended) else
              "both the recommendation and the best untuned size")
    return {"test_size": chosen, "recommended": int(recommended), "best_untuned": best_size, "reason": reason}


def candidate_sizes(train_size: int, stride: int, *, recommended_unrounded: float | None = None,
                    low: float = CANDIDATE_LOW, high: float = CANDIDATE_HIGH) -> list[int]:
    """Stride multiples from about ``low`` x T to ``high`` x T, T itself, and the stride multiples
    just below and above the unrounded recommendation (so a recommendation that rounds back to T
    still puts its neighbours on the list)."""
    lo = max(stride, int(round(low * train_size / stride)) * stride)
    hi = max(lo, int(round(high * train_size / stride)) * stride)
    sizes = set(range(lo, hi + 1, stride)) | {int(train_size)}
    if recommended_unrounded:
        below = max(stride, int(math.floor(recommended_unrounded / stride)) * stride)
        sizes |= {below, below + stride}
    return sorted(sizes)


def within_budget(row: Mapping, *, max_size: int | None = None, budget_ms: float | None = None,
                  budget_gflops: float | None = None) -> bool:
    """Whether a size's cost fits every budget given (a budget without a measured cost does not fit)."""
    if max_size is not None and int(row["test_size"]) > max_size:
        return False
    for budget, key in ((budget_ms, "ms"), (budget_gflops, "gflops")):
        if budget is not None and (row.get(key) is None or float(row[key]) > budget):
            return False
    return True


def choose_within_budget(rows: Sequence[Mapping], *, train_size: int | None = None, max_size: int | None = None,
                         budget_ms: float | None = None, budget_gflops: float | None = None) -> dict:
    """The row with the highest ``score`` among those within budget (ties: ``fixres.method.selection``'s rule).

    ``rows``: one per candidate size with ``test_size``, ``top1`` (the selection score) and the costs ``ms`` (per image)
    and ``gflops``. Raises UsageError naming the cheapest size when nothing fits.
    """
    if not rows:
        raise UsageError("no candidate sizes to choose from")
    ok = [r for r in rows if within_budget(r, max_size=max_size, budget_ms=budget_ms, budget_gflops=budget_gflops)]
    if not ok:
        cheapest = min(rows, key=lambda r: int(r["test_size"]))
        raise UsageError(f"no candidate size fits the budget; the cheapest, {cheapest['test_size']}px, costs "
                         f"{cheapest.get('ms', 'n/a')} ms/image and {cheapest.get('gflops', 'n/a')} GFLOPs")
    return best_row(ok, train_size=train_size)


def binomial_se(top1: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent measured on ``n`` images (points)."""
    p = top1 / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def within_noise(a: float, b: float, n: int, *, se_factor: float = 2.0) -> bool:
    """Whether two accuracies measured on n images each differ by less than ``se_factor`` standard errors
    of their difference (binomial, as if independent: a coarse rule for the terminal summary; a paired
    test on the same images is the finer one)."""
    return abs(a - b) < se_factor * math.hypot(binomial_se(a, n), binomial_se(b, n))


def paired_test(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact McNemar (sign) test of two classifiers on the same images: only the images on which they
    disagree count; two-sided p of as uneven a split under "equally often right"."""
    if len(a_correct) != len(b_correct):
        raise UsageError("the paired test needs the same images for both")
    only_a = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    n = only_a + only_b
    k = min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)
    return {"only_a": only_a, "only_b": only_b, "p": p}
