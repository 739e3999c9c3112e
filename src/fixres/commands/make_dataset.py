"""``fixres make-dataset``: generate the embedded data set."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("make-dataset", parents=parents, help="generate the embedded data set", description="generate the embedded data set.")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres make-dataset is not available yet")
