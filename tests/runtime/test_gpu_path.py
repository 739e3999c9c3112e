"""The CUDA data path without a GPU: pinned batches and non-blocking copies only on CUDA.

On the CPU nothing changes (no pinning: it needs a GPU driver and would only cost); on a CUDA device
evaluation asks its DataLoader to pin, and ``data.Batch`` knows how to be pinned (a DataLoader passes
a dataclass it cannot pin through untouched, which would make every "non-blocking" copy synchronous).
The device is chosen by type; the CUDA branch is exercised here by monkeypatching, and on a real GPU
by ``benchmarks/gpu_smoke.sh``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin

import fixres.method.evaluate as ev
from fixres.data.folders import scan_folder
from fixres.data.loaders import Batch, Skipped, collate, pin_memory_for
from fixres.runtime import dist as fdist
from fixres.runtime import engine
from fixres.runtime.engine import Precision

FP32 = Precision(False, None, False)


def _spy_loader(monkeypatch) -> list[dict]:
    seen: list[dict] = []
    real = ev.make_loader

    def spy(dataset, **kw):
        seen.append(kw)
        return real(dataset, **kw)

    monkeypatch.setattr(ev, "make_loader", spy)
    return seen


def test_pinning_is_chosen_by_device_type():
    assert pin_memory_for(torch.device("cuda")) and pin_memory_for(torch.device("cuda:1"))
    assert not pin_memory_for(torch.device("cpu")) and not pin_memory_for("cpu")


def test_cpu_evaluation_does_not_pin(image_folder, tiny_model, monkeypatch):
    seen = _spy_loader(monkeypatch)
    res = ev.evaluate(tiny_model.model, scan_folder(image_folder), tiny_model.data_config, test_sizes=[32],
                      workers=0, precision=FP32, progress=False)
    assert [kw["pin_memory"] for kw in seen] == [False]
    assert res.n_images == 12


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_cuda_device_selects_the_pinned_loader(image_folder, tiny_model, monkeypatch):
    """With a CUDA env, evaluate pins; the model/device moves are stubbed so the test runs on a CPU."""
    seen = _spy_loader(monkeypatch)
    moved = []
    monkeypatch.setattr(ev, "prepare", lambda model, device, precision: model)
    monkeypatch.setattr(ev, "to_device", lambda x, device, precision: moved.append(device.type) or x)
    env = fdist.DistEnv(device=torch.device("cuda"))
    cpu = ev.evaluate(tiny_model.model, scan_folder(image_folder), tiny_model.data_config, test_sizes=[32],
                      workers=0, precision=FP32, progress=False)
    res = ev.evaluate(tiny_model.model, scan_folder(image_folder), tiny_model.data_config, test_sizes=[32],
                      workers=0, precision=FP32, progress=False, env=env)
    assert [kw["pin_memory"] for kw in seen] == [False, True]
    assert set(moved) == {"cpu", "cuda"} and moved.count("cuda") == moved.count("cpu") > 0
    assert res.rows[0].correct == cpu.rows[0].correct and res.rows[0].loss == cpu.rows[0].loss


def test_batch_is_pinned_by_the_dataloader_tensor_by_tensor(monkeypatch):
    pinned = []

    def fake_pin(self, *a, **kw):  # a CPU build cannot pin: record and mark a copy instead
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    views = collate([((torch.ones(3, 4, 4), torch.zeros(3, 2, 2)), 1, 0), Skipped(1, "bad.jpg", "truncated"),
                     ((torch.ones(3, 4, 4), torch.zeros(3, 2, 2)), 2, 2)])
    out = dataloader_pin(views)  # what DataLoader(pin_memory=True) calls on every batch
    assert isinstance(out, Batch) and len(pinned) == 4  # two views, labels, indices
    assert all(any(x is p for p in pinned) for x in (*out.inputs, out.labels, out.indices))
    assert out.labels.tolist() == [1, 2] and out.skipped == views.skipped
    single = dataloader_pin(collate([(torch.ones(3, 2, 2), 0, 0)]))
    assert any(single.inputs is p for p in pinned)
    empty = dataloader_pin(collate([Skipped(0, "x.jpg", "empty file")]))
    assert empty.inputs is None and len(empty) == 0


def test_to_device_copies_without_blocking(monkeypatch):
    calls = []
    real = torch.Tensor.to

    def spy(self, *a, **kw):
        calls.append(kw.get("non_blocking"))
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    x = engine.to_device(torch.zeros(2, 3, 4, 4), torch.device("cpu"), Precision(False, None, True))
    assert calls[0] is True and x.is_contiguous(memory_format=torch.channels_last)
