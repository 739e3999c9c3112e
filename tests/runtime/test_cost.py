"""What a forward costs: sizes timed in interleaved rounds after a warm-up, median and spread, overlaps flagged; what
a training step costs, timed on a copy."""

from __future__ import annotations

import torch
from helpers import tiny_bundle
from torch import nn

from fixres.runtime import cost
from fixres.runtime.engine import Precision

FP32 = Precision(amp=False, dtype=None, channels_last=False)


class _Recorder(nn.Module):
    """Records the input size of every call (a model whose cost is the order of its calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(int(x.shape[-1]))
        return x.mean(dim=(2, 3))


def test_every_size_is_warmed_up_then_timed_in_interleaved_rounds():
    model = _Recorder()
    times = cost.latencies_ms(model, [64, 32, 48], device=torch.device("cpu"), precision=FP32, batch=1,
                              rounds=3)
    warm = cost.LATENCY_WARMUP
    assert model.calls[: 3 * warm] == [32] * warm + [48] * warm + [64] * warm
    assert model.calls[3 * warm:] == [32, 48, 64, 64, 48, 32, 32, 48, 64]
    assert sorted(times) == [32, 48, 64] and all(len(v) == 3 and min(v) >= 0 for v in times.values())


def test_a_spread_that_overlaps_a_neighbouring_size_is_flagged():
    spreads = {32: (1.0, 1.2), 64: (1.1, 1.5), 96: (2.0, 2.4), 128: (3.0, 3.1)}
    assert cost.overlapping(spreads) == {32: True, 64: True, 96: False, 128: False}
    assert cost.overlapping({64: (1.0, 2.0)}) == {64: False}


def test_measured_costs_report_the_median_inside_its_spread_and_gflops_grow_with_the_area():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    costs = cost.measure_costs(model, [16, 32], device=torch.device("cpu"), precision=FP32, batch=2)
    for c in costs.values():
        assert c["ms_spread"][0] <= c["ms"] <= c["ms_spread"][1]
        assert c["ms_batch_spread"][0] <= c["ms_batch"] <= c["ms_batch_spread"][1]
        assert c["batch"] == 2 and isinstance(c["ms_overlaps"], bool)
    assert costs[32]["gflops"] > 3.5 * costs[16]["gflops"]


def test_a_timed_training_step_leaves_the_model_as_it_was():
    model = tiny_bundle().model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = cost.train_step_seconds(model, torch.randn(4, 3, 32, 32), device=torch.device("cpu"), precision=FP32)
    assert seconds > 0 and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN statistics
