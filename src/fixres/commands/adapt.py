"""``fixres adapt``: label-free adaptation (bn-recalibrate, frechet, gaussian)."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("adapt", parents=parents, help="label-free adaptation (bn-recalibrate, frechet, gaussian)", description="label-free adaptation (bn-recalibrate, frechet, gaussian).")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres adapt is not available yet")
