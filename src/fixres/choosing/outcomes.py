"""Per-photo outcomes (right, wrong, unread) as compact text, their top-1, and paired tests on them."""

from __future__ import annotations

from typing import Sequence

from fixres.choosing.significance import paired_test


def percent_correct(outcomes: Sequence[bool | None]) -> float:
    """Top-1 in percent over the images that were read (None: unread); NaN when none was."""
    known = [o for o in outcomes if o is not None]
    return 100.0 * sum(known) / len(known) if known else float("nan")


#: Per-image outcomes as text: one character per image of the evaluated list, in its order.
CORRECT, WRONG, UNREAD = "1", "0", "."


def outcome_bits(correct: Sequence[bool], idx: Sequence[int], n: int) -> str:
    """Per-image outcomes (``correct[k]`` of image ``idx[k]``) as a string over all ``n`` images (UNREAD for
    an image that was skipped): compact enough for a step's JSON, aligned with the image list."""
    out = [UNREAD] * n
    for i, ok in zip(idx, correct):
        out[int(i)] = CORRECT if ok else WRONG
    return "".join(out)


def read_bits(bits: str) -> list[bool | None]:
    return [None if b == UNREAD else b == CORRECT for b in bits]


def paired_on_read(a: Sequence[bool | None], b: Sequence[bool | None]) -> dict:
    """``paired_test`` of two per-photo outcome lists on the photos both read (None: unread), with b's top-1
    there (``b_top1``)."""
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return {**paired_test([x for x, _ in both], [y for _, y in both]), "b_top1": percent_correct([y for _, y in both])}
