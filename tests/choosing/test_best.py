"""The one best-size rule (fixres.choosing.best): highest top-1, ties to the train size, then the smaller size."""

from __future__ import annotations

from fixres.choosing.best import best_row, best_size


def _rows(pairs):
    return [{"test_size": s, "top1": t} for s, t in pairs]


def test_highest_top1_wins_whatever_the_order():
    rows = _rows([(128, 60.0), (288, 71.5), (224, 70.0), (320, 71.0)])
    assert best_row(rows, train_size=224)["test_size"] == 288
    assert best_row(list(reversed(rows)), train_size=224)["test_size"] == 288
    assert best_size(rows) == 288


def test_ties_go_to_the_train_size_then_the_smaller_size():
    rows = _rows([(160, 71.0), (320, 71.0), (224, 71.0), (256, 71.0), (128, 70.0)])
    assert best_size(rows, train_size=224) == 224  # not the smallest of the tied sizes (160)
    assert best_size(rows, train_size=288) == 256
    assert best_size(_rows([(192, 71.0), (256, 71.0)]), train_size=224) == 192  # equally far: the smaller
    assert best_size(_rows([(256, 71.0), (192, 71.0)]), train_size=224) == 192
    assert best_size(_rows([(320, 71.0), (256, 71.0)])) == 256  # no train size: the smaller


def test_no_rows_gives_the_default():
    assert best_row([]) is None
    assert best_size([], default=64) == 64
    assert best_size(_rows([(96, None)]), default=64) == 64
