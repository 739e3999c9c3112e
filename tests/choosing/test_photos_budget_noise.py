"""Choosing the size to fix at: the held-out split, the candidates, the budget choice (pure functions)."""

from __future__ import annotations

import pytest

from fixres.choosing.budget import candidate_sizes
from fixres.choosing.photos import holdout_split
from fixres.choosing.serving import choose_within_budget, within_noise
from fixres.choosing.significance import binomial_se, paired_test
from fixres.errors import UsageError


def test_holdout_split_is_stratified_seeded_and_exact():
    samples = [(f"c{c}/{i}.jpg", c) for c in range(3) for i in range(10)] + [("c3/0.jpg", 3)]
    fit, held = holdout_split(samples, fraction=0.2, seed=0)
    assert sorted(fit + held) == sorted(samples) and not set(fit) & set(held)
    assert [sum(1 for _, y in held if y == c) for c in range(4)] == [2, 2, 2, 0]  # a 1-image class is kept whole
    assert holdout_split(samples, fraction=0.2, seed=0) == (fit, held)
    assert holdout_split(samples, fraction=0.2, seed=1)[1] != held
    with pytest.raises(UsageError):
        holdout_split(samples, fraction=1.0)


def test_candidates_include_the_unrounded_recommendations_neighbours():
    # T = 64, stride 32: 32..128; the recommendation 79 (rounds back to 64) adds 64 and 96.
    assert candidate_sizes(64, 32, recommended_unrounded=79.0) == [32, 64, 96, 128]
    assert candidate_sizes(64, 16, recommended_unrounded=79.0) == [32, 48, 64, 80, 96, 112, 128]
    assert candidate_sizes(224, 32) == [128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448]


FAKE = [  # held-out top-1 and a fake latency table (ms per image) and GFLOPs per size
    {"test_size": 64, "top1": 70.0, "ms": 1.0, "gflops": 0.1},
    {"test_size": 96, "top1": 78.0, "ms": 2.0, "gflops": 0.2},
    {"test_size": 128, "top1": 81.0, "ms": 3.5, "gflops": 0.4},
    {"test_size": 160, "top1": 80.0, "ms": 5.0, "gflops": 0.6},
]


@pytest.mark.parametrize("budget,size", [
    ({}, 128),
    ({"max_size": 100}, 96),
    ({"budget_ms": 3.0}, 96),
    ({"budget_ms": 3.5}, 128),
    ({"budget_gflops": 0.15}, 64),
    ({"budget_ms": 10.0, "budget_gflops": 0.25}, 96),
])
def test_budget_picks_the_most_accurate_size_within_budget(budget, size):
    assert choose_within_budget(FAKE, train_size=64, **budget)["test_size"] == size


def test_budget_that_nothing_fits_names_the_cheapest_size():
    with pytest.raises(UsageError, match="64px"):
        choose_within_budget(FAKE, budget_ms=0.5)
    with pytest.raises(UsageError):  # a budget on a cost that was not measured does not fit
        choose_within_budget([{"test_size": 64, "top1": 1.0}], budget_ms=5.0)


def test_binomial_se_and_noise_rule():
    assert binomial_se(50.0, 100) == pytest.approx(5.0)
    assert within_noise(80.0, 81.0, 500) and not within_noise(80.0, 90.0, 500)


def test_paired_test_counts_only_disagreements():
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [True] * 10 + [True] * 2 + [False] * 5
    res = paired_test(a, b)
    assert (res["only_a"], res["only_b"]) == (5, 2)
    assert res["p"] == pytest.approx(2 * (1 + 7 + 21) / 2 ** 7)  # P(X <= 2), X ~ Bin(7, 1/2), two-sided
    assert paired_test(a, a)["p"] == 1.0
