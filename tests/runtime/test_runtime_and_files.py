"""Paths of the small infrastructure modules that the command tests do not reach on this machine:
the precision chosen on other hardware (engine), JSON values that JSON cannot hold (atomic), a lock
file replaced by another run between open and lock (lock), and the plots' edge cases (plots)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixres.errors import FixresError
from fixres.io import atomic, lock
from fixres.report import plots
from fixres.runtime import engine
from fixres.runtime.engine import Precision

# --------------------------------------------------------------------------- engine: precision per hardware


def _cpuinfo(monkeypatch, text: str | None) -> None:
    """``/proc/cpuinfo`` as the engine reads it: ``text``, or unreadable (None)."""
    def fake_open(path, *a, **k):
        assert path == "/proc/cpuinfo"
        if text is None:
            raise PermissionError(path)
        import io
        return io.StringIO(text)
    monkeypatch.setattr(engine, "open", fake_open, raising=False)


@pytest.mark.parametrize("caps,cpuinfo,bf16", [
    ("AVX512", "flags: fpu avx512f avx512_bf16", True),
    ("AVX2", "flags: fpu avx2", False),
    ("AMX", None, True),  # AMX decides without reading cpuinfo
    ("AVX2", None, False),  # unreadable cpuinfo: no claim of bf16
])
def test_bf16_is_used_only_where_the_cpu_has_it(monkeypatch, caps, cpuinfo, bf16):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: caps)
    _cpuinfo(monkeypatch, cpuinfo)
    assert engine.cpu_supports_bf16() is bf16
    cpu = engine.precision_for(torch.device("cpu"))
    # without native bf16, autocast would emulate it (slower than fp32): fp32 + channels_last
    assert cpu == (Precision(True, torch.bfloat16, True) if bf16 else Precision(False, None, True))
    assert engine.precision_for(torch.device("cpu"), amp=False) == Precision(False, None, False)


def test_unknown_cpu_capability_means_no_bf16(monkeypatch):
    def broken():
        raise RuntimeError("no capability query on this build")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", broken)
    assert engine.cpu_supports_bf16() is False


@pytest.mark.parametrize("cpuinfo,fp16", [("flags: avx512_fp16", True), ("flags: amx_fp16", True),
                                          ("flags: avx2", False), (None, False)])
def test_inference_uses_fp16_only_where_the_cpu_computes_it(monkeypatch, cpuinfo, fp16):
    _cpuinfo(monkeypatch, cpuinfo)
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: False)
    assert engine.cpu_supports_fp16() is fp16
    got = engine.inference_precision(torch.device("cpu"))
    assert got == (Precision(True, torch.float16, True) if fp16 else Precision(False, None, True))
    assert engine.inference_precision(torch.device("cpu"), amp=False) == Precision(False, None, False)


@pytest.mark.parametrize("bf16_ok,dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_precision_follows_the_device(monkeypatch, bf16_ok, dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_ok)
    cuda = torch.device("cuda")
    assert engine.precision_for(cuda) == Precision(True, dtype, True)
    assert engine.inference_precision(cuda) == Precision(True, torch.float16, True)  # fp16 for inference
    assert Precision(True, dtype, True).describe() == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype] + \
        " autocast, channels_last"


def test_single_threaded_transform_runs_on_one_thread_and_restores(monkeypatch):
    seen = []
    wrapped = engine.SingleThreaded(lambda img: seen.append(torch.get_num_threads()) or img)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert wrapped("x") == "x"
        assert seen == [1] and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert wrapped("y") == "y" and seen == [1, 1]

        def failing(img):
            raise ValueError("bad image")
        torch.set_num_threads(2)
        with pytest.raises(ValueError):
            engine.SingleThreaded(failing)("z")
        assert torch.get_num_threads() == 2  # restored after a failure too
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- atomic: what JSON cannot hold


def test_plain_json_converts_numpy_and_paths_and_refuses_nan():
    got = atomic.plain_json({"a": np.float32(0.5), "b": np.arange(3), "p": Path("/x/y"), "t": (1, 2)})
    assert got == {"a": 0.5, "b": [0, 1, 2], "p": "/x/y", "t": [1, 2]}
    with pytest.raises(FixresError, match="NaN or infinity"):
        atomic.plain_json({"x": math.nan})
    with pytest.raises(FixresError, match="NaN or infinity"):
        atomic.plain_json({"x": np.array([1.0, np.inf])})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        atomic.plain_json({"x": object()})


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    atomic.write_json(path, {"top1": np.float64(12.5), "where": tmp_path})
    assert json.loads(path.read_text()) == {"top1": 12.5, "where": str(tmp_path)}
    with pytest.raises(FixresError, match="refusing to write"):
        atomic.write_json(path, {"top1": float("inf")})
    assert json.loads(path.read_text())["top1"] == 12.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no partial file left


def test_folder_sync_failures_do_not_fail_a_write(tmp_path, monkeypatch):
    """fsync of the folder is best effort (some file systems refuse it): the file is still written."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError("fsync not supported on this folder")
        return real_fsync(fd)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic.write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    atomic._fsync_dir(tmp_path / "missing")  # a folder that cannot be opened: nothing to sync, no error


# --------------------------------------------------------------------------- lock: the file replaced meanwhile


def test_a_lock_file_replaced_before_it_is_locked_is_locked_again(tmp_path, monkeypatch):
    """Another run releasing the folder removes its lock file; a lock taken on the removed file would guard
    nothing, so the lock is taken again on the file now at the path."""
    real_flock = lock.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(op)
        path = tmp_path / lock.LOCK_NAME
        if len(calls) == 1:  # replaced: a new file at the path
            path.unlink()
            path.write_text("other\n")
        elif len(calls) == 2:  # removed, not replaced
            path.unlink()
        return real_flock(fd, op)
    monkeypatch.setattr(lock.fcntl, "flock", flock)
    with lock.locked_folder(tmp_path):
        assert len(calls) == 3
        assert (tmp_path / lock.LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_lock_file_that_keeps_changing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_try_lock", lambda path: None)
    with pytest.raises(lock.FolderBusy, match="keeps changing"):
        with lock.locked_folder(tmp_path / "out"):
            pass


# --------------------------------------------------------------------------- plots: edge cases


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the all-zero case draws no curve to label
def test_frechet_fit_plot_with_and_without_positive_values(tmp_path):
    rng = np.random.default_rng(0)
    values = np.concatenate([np.zeros(50), rng.gamma(2.0, 0.5, 500)])
    w, h = _png_size(plots.plot_frechet_fit(values, 0.8, 0.4, 0.2, tmp_path / "fit.png"))
    assert w > 300 and h > 200
    w, h = _png_size(plots.plot_frechet_fit(np.zeros(10), 0.8, 0.4, 0.2, tmp_path / "empty.png"))  # axes only
    assert w > 300 and h > 200


def test_accuracy_plots_skip_empty_series_and_mark_the_train_size(tmp_path):
    rows = [{"test_size": s, "top1": a, "top1_std": 1.0} for s, a in ((64, 50.0), (32, 40.0))]
    p = plots.plot_accuracy_vs_size({"empty": [], "model": rows}, tmp_path / "a.png")
    assert min(_png_size(p)) > 200
    p = plots.plot_accuracy_curves([{"label": "m", "test_sizes": [32, 64], "top1": [40.0, 50.0]}],
                                   tmp_path / "c.png", train_size=32)
    assert min(_png_size(p)) > 200


def test_grid_heatmap_leaves_missing_cells_blank(tmp_path):
    grid = [[50.0, np.nan], [60.0, 55.0], [np.nan, np.nan]]
    assert min(_png_size(plots.plot_grid_heatmap([128, 224], [128, 160, 224], grid, tmp_path / "g.png"))) > 100
    all_missing = np.full((2, 2), np.nan)
    assert min(_png_size(plots.plot_grid_heatmap([128, 224], [128, 224], all_missing, tmp_path / "n.png"))) > 100
