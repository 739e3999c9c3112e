"""Process topology: single process or torchrun (torch.distributed), detected from the environment.

nccl on CUDA, gloo on CPU. Evaluation shards the data without padding (``shard_indices``) and sums
exact counts across ranks, so K processes give exactly the single-process numbers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as tdist

from fixres.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    #: the collective backend ("nccl", "gloo") when launched by torchrun, else None
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        # torchrun with one process still runs the collective code paths (a 1-GPU nccl smoke test relies on it).
        return self.world_size > 1 or self.backend is not None


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' = CUDA when available, else CPU; 'cuda' where none exists is a usage error."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


#: What torchrun (and torch.distributed.run) always export; a plain ``python`` run does not.
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """How this process was started: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) read in one place,
    one plain process where it set nothing. Read when asked, not at import: the environment is the caller's."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    by_torchrun: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "Launch":
        def number(key: str, default: int) -> int:
            return int(environ[key]) if key in environ else default
        return cls(rank=number("RANK", 0), world_size=number("WORLD_SIZE", 1), local_rank=number("LOCAL_RANK", 0),
                   by_torchrun=launched_by_torchrun(environ))


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """torchrun (and torch.distributed.run) always export ``TORCHRUN_KEYS``; a plain ``python`` run does not."""
    return all(k in environ for k in TORCHRUN_KEYS)


def refuse_distributed(command: str) -> None:
    """Commands that estimate statistics on one process's view of the data do not run under torchrun."""
    # The size is read only under torchrun: a plain run's own RANK or WORLD_SIZE, whatever they hold, is not ours.
    if launched_by_torchrun() and Launch.from_environ().world_size > 1:
        raise UsageError(f"{command} runs in one process; run it without torchrun")


def init(device: str = "auto") -> DistEnv:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or run as one process."""
    launch = Launch.from_environ()
    world, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    dev = resolve_device(device, local_rank)
    backend = None
    if world > 1 or launch.by_torchrun:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not tdist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            tdist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def shutdown() -> None:
    """Leave the process group together: a barrier first, so no rank tears gloo down while another is still
    in its last collective (seen once as "terminate called without an active exception" at exit). Called
    from a ``finally`` while an error propagates, it does not wait: the other ranks may never get there."""
    if tdist.is_available() and tdist.is_initialized():
        if sys.exc_info()[0] is None:
            try:
                tdist.barrier()
            except RuntimeError:  # a peer already gone: nothing left to wait for
                pass
        tdist.destroy_process_group()


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Strided shard of range(n): every index on exactly one rank, no padding, no duplicates."""
    return list(range(rank, n, world_size))


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process). Integer counts stay exact."""
    if not env.distributed:
        return t
    # gloo and nccl both reduce int64 exactly; move to the collective's device.
    work = t.to(env.device if env.device.type == "cuda" else "cpu")
    tdist.all_reduce(work, op=tdist.ReduceOp.SUM)
    return work.to(t.device)


def all_reduce_sum_int(value: int, env: DistEnv) -> int:
    """Sum one Python integer over ranks (exact: int64); the value itself in a single process."""
    return int(all_reduce_sum(torch.tensor([int(value)], dtype=torch.int64), env)[0])


def all_gather_objects(obj, env: DistEnv) -> list:
    """Gather a picklable Python object from every rank (rank order); [obj] in a single process."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    tdist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        tdist.barrier()
