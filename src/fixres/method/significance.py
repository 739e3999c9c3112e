"""Whether two accuracies differ beyond noise: the binomial standard error and the exact paired (McNemar) test.

``binomial_se`` is the standard error of one accuracy measured on n images; ``paired_test`` compares
two classifiers on the same images, counting only the images on which they disagree, which is far
more sensitive than comparing two error bars. Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fixres.errors import UsageError

PERCENT = 100.0
#: Below this p the paired test calls two classifiers different (two-sided).
ALPHA = 0.05


def binomial_se(top1: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent measured on ``n`` images (points)."""
    p = top1 / PERCENT
    return PERCENT * math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def paired_test(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact McNemar (sign) test of two classifiers on the same images: only the images on which they
    disagree count; two-sided p of as uneven a split under "equally often right"."""
    if len(a_correct) != len(b_correct):
        raise UsageError("the paired test needs the same images for both")
    only_a = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    n = only_a + only_b
    k = min(only_a, only_b)
    # Exact integer arithmetic: 2.0 ** n overflows a float past 1,023 disagreements.
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_a": only_a, "only_b": only_b, "p": p}
