"""``fixres report``: rebuild the HTML report of a run folder."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("report", parents=parents, help="rebuild the HTML report of a run folder", description="rebuild the HTML report of a run folder.")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres report is not available yet")
