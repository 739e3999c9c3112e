"""``fixres finetune``: FixRes fine-tuning at the test resolution."""

from __future__ import annotations


def add_parser(sub, parents):
    p = sub.add_parser("finetune", parents=parents, help="FixRes fine-tuning at the test resolution", description="FixRes fine-tuning at the test resolution.")
    return p


def run(args):
    from fixres.errors import FixresError
    raise FixresError("fixres finetune is not available yet")
