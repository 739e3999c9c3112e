"""What a forward pass costs on the device at hand: GFLOPs (torch's FLOP counter) and wall-clock latency per
image at batch 1 and batch N.

Latency is read so that sizes can be compared: every size is warmed up first, then the sizes are timed in
interleaved rounds (a slow spell of a shared machine hits every size alike, where timing one size after the
other would charge it to whichever ran then); each size reports the median of its rounds and their spread
(fastest to slowest), and a reading whose spread overlaps a neighbouring size's is flagged: their order is
within timing noise."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fixres.runtime.engine import autocast

#: Latency: warm-up calls per size, then this many interleaved rounds, at batch 1 and batch LATENCY_BATCH.
LATENCY_WARMUP = 2
LATENCY_REPEATS = 5
LATENCY_BATCH = 16


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


def _timed_ms(model: nn.Module, x: torch.Tensor, device) -> float:
    """Wall ms per image of one forward of the batch ``x`` (device synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000.0 / x.shape[0]


def latencies_ms(model: nn.Module, sizes: Sequence[int], *, device, precision, batch: int,
                 rounds: int = LATENCY_REPEATS) -> dict[int, list[float]]:
    """{size: ms per image of each round}: every size warmed up (LATENCY_WARMUP calls), then ``rounds`` rounds
    that time each size once, in ascending order on even rounds and descending on odd ones, so neither end of
    the list always runs right after a warm-up or right before a slow spell."""
    inputs = {int(s): torch.randn(batch, 3, int(s), int(s), device=device) for s in sizes}
    order = sorted(inputs)
    times: dict[int, list[float]] = {s: [] for s in order}
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        for s in order:
            for _ in range(LATENCY_WARMUP):
                model(inputs[s])
        for r in range(rounds):
            for s in (order if r % 2 == 0 else order[::-1]):
                times[s].append(_timed_ms(model, inputs[s], device))
    return times


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
    flags = overlapping({s: (min(v), max(v)) for s, v in one.items()})
    return {s: {"ms": statistics.median(one[s]), "ms_spread": [min(one[s]), max(one[s])], "ms_overlaps": flags[s],
                "ms_batch": statistics.median(many[s]), "ms_batch_spread": [min(many[s]), max(many[s])],
                "batch": batch, "gflops": gflops(model, s, device)} for s in one}
