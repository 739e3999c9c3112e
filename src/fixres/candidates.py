"""Selection after fixing: the model fixed at every candidate test size, scored where it is not reported.

Paper table 5 (right): after the fix the best test size is not the best untuned one (ResNet-50 at
224: 384 after the fix beats 288), and the fix pays most far from the train size. So each candidate
size gets its own fix (fine-tuning from the same model before the fix, with the frozen-prefix
cache: one prefix pass per size), is scored on the held-out training images (the choice) and on
the validation images (the report: before and after, the model's own table-5 column), and its
deployment cost is measured on the device at hand (ms per image at batch 1 and batch N, GFLOPs).
Only the adapted tensors of each candidate are kept (``adapted.safetensors``): a candidate is
restored by loading them over the model before the fix.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fixres.checkpoint import load_state_dict, save_safetensors
from fixres.engine import autocast

ADAPTED_NAME = "adapted.safetensors"
RESULT_NAME = "candidate.json"
#: Latency: warm-up calls, then the median of this many timed calls, at batch 1 and batch LATENCY_BATCH.
LATENCY_WARMUP = 2
LATENCY_REPEATS = 5
LATENCY_BATCH = 16
#: Share of a full forward that one cached fine-tuning epoch costs (only the adapted suffix runs,
#: forward and backward); used for the time estimate printed before the candidates run.
CACHED_EPOCH_SHARE = 0.2
#: A random-augmentation epoch runs the whole network forward and backward: about three forwards.
UNCACHED_EPOCH_SHARE = 3.0


def adapted_keys(state: dict, modules: Sequence[str]) -> list[str]:
    """State-dict keys of the adapted modules (their parameters and batch-norm buffers)."""
    prefixes = tuple(f"{m}." for m in modules)
    return [k for k in state if k.startswith(prefixes)]


def save_adapted(model: nn.Module, modules: Sequence[str], path: Path) -> None:
    state = model.state_dict()
    save_safetensors({k: state[k].detach().cpu().contiguous() for k in adapted_keys(state, modules)}, path)


def load_adapted(model: nn.Module, path: Path) -> None:
    """Load a candidate's adapted tensors over the model (which holds the weights before the fix)."""
    own = model.state_dict()
    for k, v in load_state_dict(path).items():
        own[k].copy_(v)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state, strict=True)


def gflops(model: nn.Module, size: int, device) -> float | None:
    """Forward GFLOPs of one image at ``size`` (torch's FLOP counter: multiply-adds count as 2)."""
    from torch.utils.flop_counter import FlopCounterMode
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
    """Median wall ms per image of a forward at ``size`` and ``batch`` (device synchronised)."""
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
    return statistics.median(times)


def measure_cost(model: nn.Module, size: int, *, device, precision, batch: int = LATENCY_BATCH) -> dict:
    """{"ms": per image at batch 1, "ms_batch": per image at batch N, "batch": N, "gflops"} at ``size``."""
    return {"ms": latency_ms(model, size, device=device, precision=precision, batch=1),
            "ms_batch": latency_ms(model, size, device=device, precision=precision, batch=batch), "batch": batch,
            "gflops": gflops(model, size, device)}


def predict(model: nn.Module, samples, cfg, size: int, *, batch_size: int, workers: int | None,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``model`` at ``size`` on ``samples`` (test pre-processing, fp32, skipped files left
    out): for temperature fitting and paired per-image comparisons."""
    from fixres.data import ImageDataset, make_loader
    from fixres.transforms import build_transform
    loader = make_loader(ImageDataset(samples, build_transform("test", size=size, cfg=cfg)), batch_size=batch_size,
                         workers=workers)
    out, labels = [], []
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            if batch.inputs is not None:
                out.append(model(batch.inputs.to(device)).float().cpu())
                labels.append(batch.labels)
    return torch.cat(out), torch.cat(labels)


def estimate_seconds(size: int, *, seconds_per_pixel: float, n_fit: int, n_scored: int, epochs: int,
                     cached: bool) -> float:
    """Rough time of one candidate: the prefix pass (or full epochs) over the fitting images, then
    scoring the held-out and validation images, all scaled by the image area."""
    share = CACHED_EPOCH_SHARE if cached else UNCACHED_EPOCH_SHARE
    passes = n_fit * ((1.0 if cached else 0.0) + share * epochs) + n_scored
    return seconds_per_pixel * size * size * passes


def fit_in_budget(sizes: Sequence[int], estimates: dict[int, float], budget_s: float | None,
                  keep: Sequence[int]) -> list[int]:
    """The sizes whose estimated total fits ``budget_s``: the ``keep`` sizes first, then the others
    nearest to them; the rest are dropped (and reported as such by the caller)."""
    if budget_s is None:
        return sorted(sizes)
    anchors = [k for k in keep if k in sizes] or list(sizes)[:1]
    order = sorted(sizes, key=lambda s: (s not in anchors, min(abs(s - a) for a in anchors), s))
    chosen, total = [], 0.0
    for s in order:
        if chosen and total + estimates[s] > budget_s:
            continue
        chosen.append(s)
        total += estimates[s]
    return sorted(chosen)
