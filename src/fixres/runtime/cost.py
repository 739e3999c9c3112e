"""What a forward pass costs on the device at hand: GFLOPs (torch's FLOP counter) and wall-clock latency per
image at batch 1 and batch N, the fastest of a few timed calls."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fixres.runtime.engine import autocast

#: Latency: warm-up calls, then the fastest of this many timed calls, at batch 1 and batch LATENCY_BATCH.
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


def latency_ms(model: nn.Module, size: int, *, device, precision, batch: int) -> float:
    """Fastest of LATENCY_REPEATS timed forwards at ``size`` and ``batch``, in wall ms per image (device
    synchronised). The minimum, not the median: on a shared machine other processes only ever add time,
    so the fastest call is the closest to the model's own cost."""
    x = torch.randn(batch, 3, size, size, device=device)
    model.eval()
    times = []
    with torch.inference_mode(), autocast(device, precision):
        for i in range(LATENCY_WARMUP + LATENCY_REPEATS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= LATENCY_WARMUP:
                times.append((time.perf_counter() - t0) * 1000.0 / batch)
    return min(times)


def measure_cost(model: nn.Module, size: int, *, device, precision, batch: int = LATENCY_BATCH) -> dict:
    """{"ms": per image at batch 1, "ms_batch": per image at batch N, "batch": N, "gflops"} at ``size``."""
    return {"ms": latency_ms(model, size, device=device, precision=precision, batch=1),
            "ms_batch": latency_ms(model, size, device=device, precision=precision, batch=batch), "batch": batch,
            "gflops": gflops(model, size, device)}
