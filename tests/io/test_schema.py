"""Reading JSON into result types: a field of the wrong type reads as missing, a required one makes the document
unreadable, and writing then reading gives the same value."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from fixres.io.schema import SchemaError, dump, parse, parse_or_none


@dataclass(frozen=True)
class Score:
    top1: float
    n: int | None = None


@dataclass(frozen=True)
class Row:
    test_size: int
    after: Score | None = None
    tags: tuple[str, ...] = ()
    by_size: dict[str, Score] = field(default_factory=dict)
    note: str | None = None
    flag: bool = False
    anything: object = None
    renamed: float | None = field(default=None, metadata={"json": "ms/img"})


def test_fields_of_the_right_type_are_kept_and_round_trip():
    doc = {"test_size": 128, "after": {"top1": 61.5, "n": 400}, "tags": ["a", "b"],
           "by_size": {"64": {"top1": 50.0}}, "note": "x", "flag": True, "anything": [1, {"k": 2}], "ms/img": 3.5}
    row = parse(Row, doc)
    assert row == Row(128, Score(61.5, 400), ("a", "b"), {"64": Score(50.0)}, "x", True, [1, {"k": 2}], 3.5)
    assert dump(row) == {**doc, "by_size": {"64": {"top1": 50.0, "n": None}}}
    assert parse(Row, dump(row)) == row


@pytest.mark.parametrize("bad", ["12", math.nan, math.inf, True, [1], {"a": 1}])
def test_a_number_that_is_not_one_reads_as_missing(bad):
    assert parse(Row, {"test_size": 64, "ms/img": bad}).renamed is None
    assert parse(Score, {"top1": 1.0, "n": bad}).n is None


def test_required_fields_and_broken_elements():
    with pytest.raises(SchemaError, match="test_size"):
        parse(Row, {"test_size": "64"})
    with pytest.raises(SchemaError):
        parse(Row, [1, 2])
    assert parse_or_none(Row, {}) is None
    assert parse(Row, {"test_size": 64.0}).test_size == 64 and parse_or_none(Row, {"test_size": 64.5}) is None
    row = parse(Row, {"test_size": 64, "after": {"n": 3}, "tags": ["a", 1, None, "b"],
                      "by_size": {"1": {"top1": "x"}, "2": {"top1": 2}}, "flag": 1})
    assert row.after is None and row.tags == ("a", "b") and row.by_size == {"2": Score(2.0)} and row.flag is False
