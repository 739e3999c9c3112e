"""The best measured test size: one rule for the sweep, the fix pipeline and the report.

Given result rows (dicts with ``test_size`` and ``top1``, as ``fixres.method.evaluate`` writes them, or results
with those attributes, as ``fixres.io.evaluation.ViewScore``), the
best is the row with the highest top-1. Ties (common on a few hundred images, where one image is
0.2-0.3 points) go to the size closest to the train size, then to the smaller size: the cheaper
and less extrapolated choice when the measurement cannot tell them apart. Pure Python, no torch,
so the report can import it.
"""

from __future__ import annotations

from typing import Iterable


def _field(row, name: str):
    if isinstance(row, dict):
        return row[name] if name in row else None
    return getattr(row, name, None)


def _key(row, train_size: int | None) -> tuple:
    size = int(_field(row, "test_size"))
    distance = abs(size - int(train_size)) if train_size is not None else 0
    return (-float(_field(row, "top1")), distance, size)


def best_row(rows: Iterable, *, train_size: int | None = None):
    """The row with the highest top-1; ties: closest to ``train_size``, then the smaller test size. None if no rows."""
    rows = [r for r in rows if _field(r, "top1") is not None]
    return min(rows, key=lambda r: _key(r, train_size)) if rows else None


def best_size(rows: Iterable, *, train_size: int | None = None, default: int | None = None) -> int | None:
    """``best_row``'s test size, or ``default`` when there are no rows."""
    row = best_row(rows, train_size=train_size)
    return int(_field(row, "test_size")) if row is not None else default


__all__ = ["best_row", "best_size"]
