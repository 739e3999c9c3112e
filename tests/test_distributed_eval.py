"""Distributed evaluation gives exactly the single-process numbers (torchrun, gloo, 2 processes).

The data set has an odd number of readable images plus an unreadable file, so the two ranks get
shards of different sizes (strided, no padding) and only one of them meets the skip. The ranks use
a different batch size from the single process, so batch composition differs too. fp32 (--no-amp)
keeps the per-image arithmetic identical; what is under test is sharding and reduction.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import VENV_BIN, write_image_folder

SIZES = "32,48"
TIMEOUT_S = 180


def _checkpoint(tmp_path: Path) -> Path:
    """A tiny model with a spread-out head, so predictions differ between images (saved: both runs load it)."""
    from fixres.checkpoint import save_safetensors
    from fixres.models import load_model
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

    from fixres.cli import main
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
