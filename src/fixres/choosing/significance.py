"""Whether two accuracies differ beyond noise: the binomial standard error, exact paired tests, Holm's correction.

``binomial_se`` is the standard error of one accuracy measured on n images; ``paired_test`` compares
two classifiers on the same images, counting only the images on which they disagree, which is far
more sensitive than comparing two error bars. ``clustered_sign_test`` is the same exact test where each
photo contributes several correlated outcomes (one per severity of a corruption): the photo, not the
outcome, is the unit, so dependent outcomes are never counted as independent evidence. ``holm`` adjusts
the p-values of a family of tests (a table) so that the chance of any false "differs" stays at alpha.
Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fixres.errors import UsageError
from fixres.io.evaluation import binomial_se_of

#: Below this p the paired test calls two classifiers different (two-sided).
ALPHA = 0.05


def binomial_se(top1: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent measured on ``n`` images (points); NaN without images."""
    return binomial_se_of(top1, n) if n else float("nan")


def paired_test(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact McNemar (sign) test of two classifiers on the same images: only the images on which they
    disagree count; two-sided p of as uneven a split under "equally often right"."""
    if len(a_correct) != len(b_correct):
        raise UsageError("the paired test needs the same images for both")
    only_a = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    return {"only_a": only_a, "only_b": only_b, "p": sign_p(only_a, only_b)}


def sign_p(wins_a: int, wins_b: int) -> float:
    """Two-sided exact sign test: p of as uneven a split of ``wins_a + wins_b`` non-ties under a fair coin."""
    n = wins_a + wins_b
    k = min(wins_a, wins_b)
    # Exact integer arithmetic: 2.0 ** n overflows a float past 1,023 disagreements.
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def clustered_sign_test(hits_a: Sequence[int], hits_b: Sequence[int]) -> dict:
    """Exact sign test on per-photo differences: ``hits_a[i]`` and ``hits_b[i]`` count how often each classifier
    was right on photo i over its correlated trials (e.g. the severities of one corruption). A photo counts
    once, for the classifier that was right more often on it; ties (equal counts) carry no evidence.
    Returns {"only_a": photos where a was right more often, "only_b": the converse, "p"}."""
    if len(hits_a) != len(hits_b):
        raise UsageError("the paired test needs the same images for both")
    only_a = sum(1 for a, b in zip(hits_a, hits_b) if a > b)
    only_b = sum(1 for a, b in zip(hits_a, hits_b) if b > a)
    return {"only_a": only_a, "only_b": only_b, "p": sign_p(only_a, only_b)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: a test differs at level alpha after the
    correction when its adjusted p is below alpha, and the family's chance of any false call stays at alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
