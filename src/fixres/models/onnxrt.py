"""Latency on the serving runtime: the model exported to ONNX at each size and timed in ONNX Runtime.

Eager PyTorch is rarely what serves a model. Each size gets its own ONNX graph (``export.write_onnx``, the
exporter ``finetune --onnx`` uses), run by ONNX Runtime on this machine's CPU with as many threads as torch
uses here, timed as ``runtime.cost`` times PyTorch: warm-up, interleaved rounds, median and spread, at batch 1
and batch N. The graph is the model's architecture at that size; a fix changes only weights, so the model
before the fix stands for every candidate at its size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fixres.errors import UsageError
from fixres.models.export import write_onnx
from fixres.runtime.cost import LATENCY_BATCH, interleaved_ms, latency_table, measure_costs

#: The runtimes a latency can be read on: eager PyTorch as the model runs here, or ONNX Runtime.
TORCH, ONNXRUNTIME = "torch", "onnxruntime"
LATENCY_RUNTIMES = (TORCH, ONNXRUNTIME)
INSTALL_HINT = "pip install 'fixres[onnxruntime]'"


def _runtime():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError as exc:
        raise UsageError(f"--latency-on onnxruntime needs the {exc.name} package ({INSTALL_HINT})") from None
    return onnxruntime


def onnxruntime_costs(model: nn.Module, sizes: Sequence[int], *, batch: int = LATENCY_BATCH) -> dict[int, dict]:
    """{size: {"ms", "ms_spread", "ms_overlaps", "ms_batch", "ms_batch_spread", "batch"}} of ``model`` exported to
    ONNX at each size and run by ONNX Runtime on the CPU (``runtime.cost.latency_table``)."""
    ort = _runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="fixres-onnx-") as folder:
        for s in sorted({int(v) for v in sizes}):
            path = Path(folder) / f"{s}.onnx"
            write_onnx(model, path, s)
            sessions[s] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def calls(n: int) -> dict:
        feeds = {s: {"input": rng.standard_normal((n, 3, s, s), dtype=np.float32)} for s in sessions}
        return {s: (lambda s=s: sessions[s].run(None, feeds[s])) for s in sessions}

    one, many = interleaved_ms(calls(1), batch=1), interleaved_ms(calls(batch), batch=batch)
    return latency_table(one, many, batch)


def on_runtime(costs: dict[int, dict], runtime_costs: dict[int, dict], runtime: str) -> dict[int, dict]:
    """``costs`` (PyTorch's, with GFLOPs) with their latency read on ``runtime`` instead: ``ms`` and its companions
    are the runtime's (what a budget and the frontier use), PyTorch's stay beside them as ``ms_torch`` and
    ``ms_batch_torch``; ``latency_on`` names the runtime."""
    return {s: {**row, **runtime_costs[s], "ms_torch": row["ms"], "ms_batch_torch": row["ms_batch"],
                "latency_on": runtime} for s, row in costs.items()}


def costs_on(model: nn.Module, sizes: Sequence[int], *, runtime: str, device, precision) -> dict[int, dict]:
    """``runtime.cost.measure_costs`` of ``model`` at ``sizes``, its latency read on ``runtime`` (``on_runtime``)
    when that is not PyTorch."""
    costs = measure_costs(model, sizes, device=device, precision=precision)
    return costs if runtime == TORCH else on_runtime(costs, onnxruntime_costs(model, sizes), runtime)
