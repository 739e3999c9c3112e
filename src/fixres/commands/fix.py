"""``fixres fix``: the whole method: analyse, sweep, fine-tune, report."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("fix", parents=parents, help="the whole method: analyse, sweep, fine-tune, report", description="the whole method: analyse, sweep, fine-tune, report.")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres fix is not available yet")
