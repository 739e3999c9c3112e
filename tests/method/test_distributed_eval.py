"""Distributed evaluation gives exactly the single-process numbers (torchrun, gloo, 2 processes).

The data set has an odd number of readable images plus an unreadable file, so the two ranks get
shards of different sizes (strided, no padding) and only one of them meets the skip. The ranks use
a different batch size from the single process, so batch composition differs too. fp32 (--no-amp)
keeps the per-image arithmetic identical; what is under test is sharding and reduction.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image_folder
from helpers.cli import VENV_BIN

SIZES = "32,48"
TIMEOUT_S = 180


def _checkpoint(tmp_path: Path) -> Path:
    """A tiny model with a spread-out head, so predictions differ between images (saved: both runs load it)."""
    from fixres.io.checkpoint import save_safetensors
    from fixres.models.loading import load_model
    torch.manual_seed(0)
    model = load_model(model="fixres_tiny_resnet", num_classes=3).model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
        model.fc.bias.copy_(torch.randn(3, generator=g) * 0.05)
    return save_safetensors(model.state_dict(), tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("nproc", [2, 1])
def test_torchrun_gives_single_process_counts(tmp_path, capsys, nproc):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found in the venv")
    data = write_image_folder(tmp_path / "data", classes=3, per_class=3)  # 9 images
    (data / "class_1" / "zz_broken.jpg").write_bytes(b"not an image at all")
    ckpt = _checkpoint(tmp_path)
    common = ["sweep", "--data", str(data), "--model", "fixres_tiny_resnet", "--checkpoint", str(ckpt),
              "--test-sizes", SIZES, "--ensemble", SIZES, "--no-amp", "--workers", "0", "-q", "--no-plot"]

    from fixres.cli.app import main
    assert main(common + ["--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "fixres", *common,
                           "--batch-size", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = json.loads((tmp_path / "one" / "sweep.json").read_text())
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, nproc)
    # under torchrun even one process runs the collectives (gloo here, nccl on a GPU)
    assert (one["backend"], two["backend"]) == (None, "gloo")
    assert one["n_images"] == two["n_images"] == 9 and one["n_samples"] == two["n_samples"] == 10
    assert one["skipped"] == two["skipped"] and len(one["skipped"]) == 1
    for a, b in zip(one["rows"] + one["ensembles"], two["rows"] + two["ensembles"], strict=True):
        for key in ("correct", "correct5", "n", "top1", "top1_std", "top5", "top5_std"):
            assert a[key] == b[key], key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert len({r["correct"] for r in one["rows"] + one["ensembles"]}) > 1 or 0 < one["rows"][0]["correct"] < 9
    assert (tmp_path / "one" / "per_class.csv").read_text() == (tmp_path / "two" / "per_class.csv").read_text()
    # only rank 0 printed and wrote: one set of files, one table
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["per_class.csv", "sweep.csv", "sweep.json"]
    assert proc.stdout.count("results:") <= 1


class _FakeCollectives:
    """torch.distributed's all_reduce / all_gather_object for ranks run as threads of this process."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)

    def _exchange(self, obj, rank: int) -> list:
        self.slots[rank] = obj
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return got

    def all_gather_objects(self, obj, env):
        return copy.deepcopy(self._exchange(obj, env.rank))

    def all_reduce_sum(self, t, env):
        return torch.stack(self._exchange(t.clone(), env.rank)).sum(0)


def _evaluate_as_ranks(model, samples, cfg, world_size: int, monkeypatch, **kw) -> list[dict]:
    from fixres.method.evaluate import evaluate
    from fixres.runtime import dist as fdist
    fake = _FakeCollectives(world_size)
    monkeypatch.setattr(fdist, "all_gather_objects", fake.all_gather_objects)
    monkeypatch.setattr(fdist, "all_reduce_sum", fake.all_reduce_sum)
    results: list = [None] * world_size
    errors: list = []

    def rank_main(rank):
        try:
            env = fdist.DistEnv(rank=rank, world_size=world_size)
            results[rank] = evaluate(copy.deepcopy(model), samples, cfg, env=env, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class _ColourNet(torch.nn.Module):
    """A random conv + linear head whose predictions vary from image to image (right on about half of them)."""

    def __init__(self, seed: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(8, 3, 3, 3, generator=g))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.randn(3, 8, generator=g) * 3)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("n", [21, 50])  # more images than the 10 folds
def test_gathered_results_are_put_back_in_single_process_order(tmp_path, tiny_model, monkeypatch, n):
    """Two ranks hold interleaved shards (0, 2, 4, ... and 1, 3, 5, ...). The fold std assigns image i to fold
    i % 10, so with more images than folds it depends on the order: the gathered per-image results must be
    re-ordered into data-set order, or the std (and nothing else) silently changes."""
    from fixres.data.folders import scan_folder
    from fixres.method.evaluate import evaluate, fold_std
    from fixres.runtime.engine import Precision
    data = write_image_folder(tmp_path / "data", classes=3, per_class=17)
    samples = scan_folder(data).samples
    samples = [samples[i] for i in np.linspace(0, len(samples) - 1, n).round().astype(int)]
    model = _ColourNet()
    kw = dict(test_sizes=[32, 48], ensembles=[(32, 48)], batch_size=4, workers=0, progress=False,
              precision=Precision(False, None, False), keep_log_probs=True)
    one = evaluate(copy.deepcopy(model), samples, tiny_model.data_config, **kw)
    ranks = _evaluate_as_ranks(model, samples, tiny_model.data_config, 2, monkeypatch, **kw)
    for two in ranks:  # every rank returns the full, identical result
        assert two.n_images == n and two.world_size == 2
        assert np.array_equal(two.arrays.labels, one.arrays.labels)
        for a, b in zip(one.rows + one.ensembles, two.rows + two.ensembles, strict=True):
            for key in ("correct", "correct5", "n", "top1", "top1_std", "top5", "top5_std"):
                assert getattr(a, key) == getattr(b, key), key
            # other batch compositions: the same per-image arithmetic up to float rounding
            assert (a.loss, a.ece) == pytest.approx((b.loss, b.ece), rel=1e-5)
        assert two.per_class == one.per_class
    # the premise: in the interleaved (un-re-ordered) order the fold std is a different number
    hits = {key: lp.argmax(1) == one.arrays.labels for key, lp in one.arrays.log_probs.items()}
    assert [fold_std(h) for h in hits.values()] == [r.top1_std for r in one.rows + one.ensembles]
    assert any(fold_std(np.concatenate([h[0::2], h[1::2]])) != fold_std(h) for h in hits.values())
    assert all(0 < h.sum() < n for h in hits.values())
