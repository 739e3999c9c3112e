"""``fixres train``: train at a (low) resolution, from scratch or transfer."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("train", parents=parents, help="train at a (low) resolution, from scratch or transfer", description="train at a (low) resolution, from scratch or transfer.")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres train is not available yet")
