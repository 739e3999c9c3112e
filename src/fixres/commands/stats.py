"""``fixres stats``: pooled-activation statistics across test sizes."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("stats", parents=parents, help="pooled-activation statistics across test sizes", description="pooled-activation statistics across test sizes.")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres stats is not available yet")
