"""Repeated-augmentation sampler: counts per epoch, split of copies across ranks, seeding."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fixres.errors import UsageError
from fixres.method.sampler import RepeatedAugSampler


def _epoch(n, repeats, world, seed=0, epoch=0, **kw):
    per_rank = []
    for rank in range(world):
        s = RepeatedAugSampler(n, repeats=repeats, rank=rank, world_size=world, seed=seed, **kw)
        s.set_epoch(epoch)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    return per_rank


@pytest.mark.parametrize("n,world", [(12, 1), (12, 2), (13, 2), (10, 3)])
def test_full_repeated_epoch_draws_every_index_repeats_times(n, world):
    repeats = 3
    per_rank = _epoch(n, repeats, world, samples_per_epoch=repeats * n)
    counts = Counter(i for part in per_rank for i in part)
    padding = math.ceil(repeats * n / world) * world - repeats * n
    assert set(counts) == set(range(n))
    # Every index exactly `repeats` times; wrap-around padding adds at most one extra copy to a few.
    assert sorted(counts.values()) == sorted([repeats] * (n - padding) + [repeats + 1] * padding)


@pytest.mark.parametrize("n,world", [(12, 1), (30, 2), (31, 2)])
def test_default_epoch_is_one_data_set_of_samples_in_groups_of_copies(n, world):
    repeats = 3
    per_rank = _epoch(n, repeats, world)
    assert all(len(p) == math.ceil(n / world) for p in per_rank)
    drawn = [i for part in per_rank for i in part]
    assert len(drawn) == world * math.ceil(n / world)
    counts = Counter(drawn)
    # Copies come in groups: every drawn image has its `repeats` copies, except the one cut at the end.
    partial = [i for i, c in counts.items() if c != repeats]
    assert len(partial) <= 1
    assert len(counts) == math.ceil(len(drawn) / repeats)


def test_copies_of_an_image_are_split_across_two_ranks():
    n, repeats = 16, 3
    r0, r1 = _epoch(n, repeats, 2, samples_per_epoch=repeats * n)
    for i in range(n):
        c0, c1 = r0.count(i), r1.count(i)
        assert c0 + c1 == repeats
        assert c0 >= 1 and c1 >= 1, f"all copies of image {i} on one rank"
    # The copies meet in the same global step: position p on rank 0 and p (or p +- 1) on rank 1.
    s = RepeatedAugSampler(n, repeats=repeats, rank=0, world_size=2, seed=0)
    order = s.global_order()
    assert order[:repeats] == [order[0]] * repeats


def test_world_of_three_puts_each_copy_on_its_own_rank():
    per_rank = _epoch(9, 3, 3, samples_per_epoch=27)
    for i in range(9):
        assert [p.count(i) for p in per_rank] == [1, 1, 1]


def test_single_process_epoch_equals_union_of_ranks_per_global_batch():
    n, repeats, global_batch = 24, 3, 8
    (single,) = _epoch(n, repeats, 1, seed=5, epoch=2)
    r0, r1 = _epoch(n, repeats, 2, seed=5, epoch=2)
    half = global_batch // 2
    for step in range(n // global_batch):
        both = sorted(r0[step * half:(step + 1) * half] + r1[step * half:(step + 1) * half])
        assert both == sorted(single[step * global_batch:(step + 1) * global_batch])


def test_seeded_by_seed_and_epoch():
    a = _epoch(50, 3, 1, seed=1, epoch=0)[0]
    assert a == _epoch(50, 3, 1, seed=1, epoch=0)[0]
    assert a != _epoch(50, 3, 1, seed=1, epoch=1)[0]
    assert a != _epoch(50, 3, 1, seed=2, epoch=0)[0]


def test_repeats_one_is_a_plain_shuffle():
    (order,) = _epoch(20, 1, 1, seed=3)
    assert sorted(order) == list(range(20))
    assert order != list(range(20))


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError):
        RepeatedAugSampler(0)
    with pytest.raises(UsageError):
        RepeatedAugSampler(5, repeats=0)
    with pytest.raises(UsageError):
        RepeatedAugSampler(5, rank=2, world_size=2)


@pytest.mark.parametrize("n,world", [(30, 1), (30, 2), (31, 3)])
def test_paper_len_factor_draws_twice_the_samples_in_groups_of_copies(n, world):
    """The official RASampler(len_factor=2.0) epoch: ~2N samples, still split per rank."""
    from fixres.method.sampler import PAPER_LEN_FACTOR
    repeats = 3
    per_rank = _epoch(n, repeats, world, len_factor=PAPER_LEN_FACTOR)
    assert PAPER_LEN_FACTOR == 2.0
    assert all(len(p) == math.ceil(2 * n / world) for p in per_rank)
    drawn = [i for part in per_rank for i in part]
    counts = Counter(drawn)
    assert len([i for i, c in counts.items() if c != repeats]) <= 1  # whole groups of copies
    assert len(counts) == math.ceil(len(drawn) / repeats)  # ~2n/3 distinct images, not n/3
    # The default epoch is half as long, and the longer one starts with the same images.
    assert len(_epoch(n, repeats, world)[0]) == math.ceil(n / world)
    assert _epoch(n, repeats, world)[0] == per_rank[0][:math.ceil(n / world)]


def test_len_factor_longer_than_the_repeated_list_wraps_evenly():
    (order,) = _epoch(10, 1, 1, len_factor=2.0)
    assert len(order) == 20 and Counter(order) == {i: 2 for i in range(10)}
    with pytest.raises(UsageError, match="len_factor"):
        RepeatedAugSampler(10, len_factor=0)
    with pytest.raises(UsageError, match="len_factor"):
        RepeatedAugSampler(10, len_factor=float("inf"))
