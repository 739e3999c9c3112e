"""What a forward pass costs on the device at hand: GFLOPs (torch's FLOP counter) and wall-clock latency per
image at batch 1 and batch N.

Latency is read so that sizes can be compared: every size is warmed up first, then the sizes are timed in
interleaved rounds (a slow spell of a shared machine hits every size alike, where timing one size after the
other would charge it to whichever ran then); each size reports the median of its rounds and their spread
(fastest to slowest), and a reading whose spread overlaps a neighbouring size's is flagged: their order is
within timing noise."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fixres.runtime.engine import autocast, prepare, to_device

#: Latency: warm-up calls per size, then this many interleaved rounds, at batch 1 and batch LATENCY_BATCH.
LATENCY_WARMUP = 2
LATENCY_REPEATS = 5
LATENCY_BATCH = 16
#: A training step: timed this many times after one warm-up step, the median taken.
TRAIN_STEP_REPEATS = 2


def gflops(model: nn.Module, size: int, device) -> float | None:
    """Forward GFLOPs of one image at ``size`` (torch's FLOP counter: multiply-adds count as 2)."""
    x = torch.zeros(1, 3, size, size, device=device)
    was = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops() / 1e9
    except Exception:  # noqa: BLE001 - an operator the counter does not know: cost unknown, not fatal
        return None
    finally:
        model.train(was)


def interleaved_ms(calls: Mapping[int, Callable[[], object]], *, batch: int, rounds: int = LATENCY_REPEATS,
                   sync: Callable[[], None] = lambda: None) -> dict[int, list[float]]:
    """{size: ms per image of each round} of ``calls`` ({size: one forward of a batch of ``batch``}, on any
    runtime): every size warmed up (LATENCY_WARMUP calls), then ``rounds`` rounds that time each size once, in
    ascending order on even rounds and descending on odd ones, so neither end of the list always runs right after
    a warm-up or right before a slow spell. ``sync`` waits for queued work (a GPU's) before each clock read."""
    order = sorted(calls)
    times: dict[int, list[float]] = {s: [] for s in order}
    for s in order:
        for _ in range(LATENCY_WARMUP):
            calls[s]()
    for r in range(rounds):
        for s in (order if r % 2 == 0 else order[::-1]):
            sync()
            t0 = time.perf_counter()
            calls[s]()
            sync()
            times[s].append((time.perf_counter() - t0) * 1000.0 / batch)
    return times


def latencies_ms(model: nn.Module, sizes: Sequence[int], *, device, precision, batch: int,
                 rounds: int = LATENCY_REPEATS) -> dict[int, list[float]]:
    """{size: ms per image of each round} of ``model`` in PyTorch (``interleaved_ms``)."""
    inputs = {int(s): torch.randn(batch, 3, int(s), int(s), device=device) for s in sizes}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        return interleaved_ms({s: (lambda x=x: model(x)) for s, x in inputs.items()}, batch=batch, rounds=rounds,
                              sync=sync)


def latency_ms(model: nn.Module, size: int, *, device, precision, batch: int) -> float:
    """Median ms per image of LATENCY_REPEATS timed forwards at ``size`` and ``batch`` (after a warm-up)."""
    return statistics.median(latencies_ms(model, [size], device=device, precision=precision, batch=batch)[size])


def overlapping(spreads: dict[int, tuple[float, float]]) -> dict[int, bool]:
    """{size: whether its (fastest, slowest) spread overlaps the spread of the size below or above it}."""
    order = sorted(spreads)
    out = {}
    for i, s in enumerate(order):
        lo, hi = spreads[s]
        neighbours = [spreads[order[j]] for j in (i - 1, i + 1) if 0 <= j < len(order)]
        out[s] = any(lo <= n_hi and n_lo <= hi for n_lo, n_hi in neighbours)
    return out


def measure_costs(model: nn.Module, sizes: Sequence[int], *, device, precision,
                  batch: int = LATENCY_BATCH) -> dict[int, dict]:
    """{size: {"ms", "ms_spread", "ms_overlaps", "ms_batch", "ms_batch_spread", "batch", "gflops"}}: median ms per
    image at batch 1 and at batch N with their spreads [fastest, slowest] over the interleaved rounds, whether
    the batch-1 spread overlaps a neighbouring size's (``overlapping``), and the GFLOPs of one image."""
    one = latencies_ms(model, sizes, device=device, precision=precision, batch=1)
    many = latencies_ms(model, sizes, device=device, precision=precision, batch=batch)
    return {s: {**row, "gflops": gflops(model, s, device)} for s, row in latency_table(one, many, batch).items()}


def latency_table(one: Mapping[int, list[float]], many: Mapping[int, list[float]], batch: int) -> dict[int, dict]:
    """{size: {"ms", "ms_spread", "ms_overlaps", "ms_batch", "ms_batch_spread", "batch"}} from the rounds at
    batch 1 (``one``) and at batch ``batch`` (``many``)."""
    flags = overlapping({s: (min(v), max(v)) for s, v in one.items()})
    return {s: {"ms": statistics.median(one[s]), "ms_spread": [min(one[s]), max(one[s])], "ms_overlaps": flags[s],
                "ms_batch": statistics.median(many[s]), "ms_batch_spread": [min(many[s]), max(many[s])],
                "batch": batch} for s in one}


def train_step_seconds(model: nn.Module, batch: torch.Tensor, *, device, precision) -> float:
    """Median seconds of one training step of a copy of ``model`` on ``batch``: the forward in train mode at
    ``precision`` (channels_last where it applies), a cross-entropy loss, its backward and an SGD step with momentum.
    ``model`` itself is left as it is."""
    net = prepare(copy.deepcopy(model), device, precision).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)  # the step's cost, not its effect
    x = to_device(batch, device, precision)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = net(x)
        nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
    return median_seconds(step, repeats=TRAIN_STEP_REPEATS)


def median_seconds(fn: Callable[[], object], *, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
