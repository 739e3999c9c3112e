"""``fixres finetune`` under torchrun (gloo, 2 processes) equals the single-process fine-tune.

Each rank caches and trains on its own shard of the images; the summed gradients are those of the
global batch. With ``--parts classifier`` no batch-norm runs in train mode, and with one global batch
holding every image the two runs see the same batches, so the fixed models must agree up to float
summation order. A second run with an odd image count and ``classifier,bn`` checks the uneven shards
(padding steps) and the averaged batch-norm statistics finish, counting each image at most once.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import VENV_BIN

TIMEOUT_S = 180


def _torchrun(args, tmp_path):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found in the venv")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fixres", *args],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_finetune_matches_one_process(tmp_path, capsys):
    from safetensors.torch import load_file

    from fixres.cli.app import main
    data = tmp_path / "data"  # it fits on train/ (12 images) and reports val/
    write_image_folder(data / "train", classes=3, per_class=4, seed=5)
    write_image_folder(data / "val", classes=3, per_class=2, seed=9)
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    common = ["finetune", "--model", "fixres_tiny_resnet", "--checkpoint", str(ckpt), "--num-classes", "3",
              "--train-size", "32", "--data", str(data), "--test-size", "48", "--parts", "classifier",
              "--epochs", "3", "--batch-size", "12", "--lr", "2.0", "--no-amp", "--workers", "0", "-q", "--json",
              "--cache-budget-mb", "0.001"]  # a tiny budget: the activation cache goes to disk, one file per rank
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    proc = _torchrun(common + ["--out", str(tmp_path / "two")], tmp_path)
    two = json.loads(proc.stdout)  # only rank 0 prints

    assert one["cache"]["used"] and two["cache"]["used"] and one["cache"]["on_disk"] and two["cache"]["on_disk"]
    assert [r["images"] for r in two["log"]] == [12, 12, 12]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    init = load_file(str(ckpt))
    moved = max(float((a[k] - init[k]).abs().max()) for k in a if k.startswith("fc."))
    assert moved > 1e-2, "fine-tuning barely moved the classifier: the comparison would prove nothing"
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), f"{k}: {float((a[k] - b[k]).abs().max())}"
    assert two["after"]["top1"] == one["after"]["top1"] and two["after"]["n"] == one["after"]["n"] == 6  # val/
    # each rank spilled its own shard to its own folder (the memory-mapped file is removed at the end)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("cache")) == \
        ["cache_rank0", "cache_rank1"]
    assert not any((tmp_path / "two").glob("cache_rank*/*"))


@pytest.mark.slow
def test_two_process_finetune_uneven_shards_with_batch_norm(tmp_path):
    data = tmp_path / "data"  # it fits on train/ and reports val/
    write_image_folder(data / "train", classes=3, per_class=4, seed=6)
    write_image_folder(data / "val", classes=3, per_class=2, seed=9)
    (data / "train" / "class_2" / "img_003.jpg").unlink()  # 11 images: shards of 6 and 5
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    proc = _torchrun(["finetune", "--model", "fixres_tiny_resnet", "--checkpoint", str(ckpt), "--num-classes", "3",
                      "--train-size", "32", "--data", str(data), "--test-size", "48", "--epochs", "2",
                      "--batch-size", "4", "--no-amp", "--workers", "0", "-q", "--json",
                      "--out", str(tmp_path / "two")], tmp_path)
    res = json.loads(proc.stdout)
    assert res["parts"] == ["classifier", "norm"]  # the default: for this CNN, its batch-norm before pooling
    # local batches of 2: rank 0 runs 2+2+2, rank 1 runs 2+2 and a padding step; its last single image is
    # left out, as in one process, because batch-norm in train mode cannot normalise one image
    assert [r["images"] for r in res["log"]] == [10, 10]
    state = torch.load(tmp_path / "two" / "finetune_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["world_size"] == 2
