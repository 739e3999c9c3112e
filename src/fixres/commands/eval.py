"""``fixres eval``: evaluate a classifier at one test size and crop ratio."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("eval", parents=parents, help="evaluate a classifier at one test size and crop ratio", description="evaluate a classifier at one test size and crop ratio.")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres eval is not available yet")
