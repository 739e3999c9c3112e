"""DDP training equals single-process training with the same global batch (torchrun, gloo, 2 processes).

Why the model has no BatchNorm: BN in training mode normalises with the statistics of the batch it
sees, which under DDP is each rank's half of the global batch, so a K-rank step is a different
function from a 1-process step by design (SyncBatchNorm would fix that, but it is CUDA-only in
PyTorch). Without BN, the DDP gradient (the mean over ranks of per-rank mean losses, equal halves)
is exactly the single-process gradient of the global batch, so the parameters must agree up to
float summation order. Augmentation is the deterministic "test" transform so both runs feed the
same pixels; the sample order comes from the repeated-augmentation sampler in both.

This file doubles as the torchrun worker script (``python -m torch.distributed.run ... THIS_FILE``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

N_STEPS = 2
GLOBAL_BATCH = 4
IMAGES = 8  # repeats 3 -> ceil(8 / 2) = 4 samples per rank per epoch -> 2 steps of 2 per rank
LR = 0.5


def _tiny_model_without_bn():
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))


def run_steps(data_dir: Path, out_dir: Path, env=None) -> dict:
    """Train the BN-free model for 2 steps; return the result and write weights.pt (rank 0)."""
    import torch

    from fixres.config import DataConfig
    from fixres.data import scan_folder
    from fixres.engine import precision_for
    from fixres.train import train

    samples = scan_folder(data_dir).samples[:IMAGES]
    model = _tiny_model_without_bn()
    cfg = DataConfig(train_size=32, num_classes=3)
    precision = precision_for(torch.device("cpu"), amp=False)
    result = train(model, samples, [], cfg, train_size=32, epochs=1, batch_size=GLOBAL_BATCH, lr=LR,
                   out_dir=out_dir, repeats=3, augment="test", env=env, precision=precision, seed=7, workers=0,
                   progress=False, max_steps=N_STEPS, model_name="tiny_nobn")
    if env is None or env.is_main:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / "weights.pt")
    return result


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    import torch

    from conftest import VENV_BIN, write_image_folder

    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, seed=3)
    single = tmp_path / "single"
    res = run_steps(data, single)
    assert res["epochs"][-1]["step"] == N_STEPS

    ddp = tmp_path / "ddp"
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed in this environment")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent)}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", __file__, str(data), str(ddp)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = torch.load(single / "weights.pt", weights_only=True)
    b = torch.load(ddp / "weights.pt", weights_only=True)
    init = _tiny_model_without_bn().state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved > 1e-2, "the two steps barely moved the weights: the comparison would prove nothing"
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), f"{k} differs: {float((a[k] - b[k]).abs().max())}"


if __name__ == "__main__":
    from fixres import dist
    env = dist.init("cpu")
    try:
        res = run_steps(Path(sys.argv[1]), Path(sys.argv[2]), env=env)
        assert res["epochs"][-1]["step"] == N_STEPS, res["epochs"]
        assert res["hparams"]["world_size"] == 2
    finally:
        dist.shutdown()
