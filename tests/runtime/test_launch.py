"""torchrun's environment read in one place (``dist.Launch``): a plain process, a torchrun rank, and a plain
process whose own RANK or WORLD_SIZE are not torchrun's."""

from __future__ import annotations

import pytest

from fixres.errors import UsageError
from fixres.runtime import dist

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_a_plain_process_is_rank_zero_of_one():
    assert dist.Launch.from_environ({}) == dist.Launch(rank=0, world_size=1, local_rank=0, by_torchrun=False)


def test_a_torchrun_rank_reads_its_place():
    assert dist.Launch.from_environ(TORCHRUN) == dist.Launch(rank=3, world_size=4, local_rank=1, by_torchrun=True)
    # torchrun always exports the rendezvous address: without it the variables are someone else's
    partial = {k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}
    assert not dist.launched_by_torchrun(partial) and not dist.Launch.from_environ(partial).by_torchrun


def test_refuse_distributed_reads_the_size_only_under_torchrun(monkeypatch):
    for key in dist.TORCHRUN_KEYS + ("LOCAL_RANK",):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "not a number")  # a plain run's own variable: not read
    dist.refuse_distributed("fixres stats")
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match="fixres stats runs in one process"):
        dist.refuse_distributed("fixres stats")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.refuse_distributed("fixres stats")  # torchrun with one process computes what one process does
