"""``fixres sweep``: accuracy across test sizes (one pass over the data)."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("sweep", parents=parents, help="accuracy across test sizes (one pass over the data)", description="accuracy across test sizes (one pass over the data).")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres sweep is not available yet")
