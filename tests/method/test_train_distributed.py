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
from helpers import tiny_classifier

N_STEPS = 2
GLOBAL_BATCH = 4
IMAGES = 8  # repeats 3 -> ceil(8 / 2) = 4 samples per rank per epoch -> 2 steps of 2 per rank
LR = 0.5


def _tiny_model_without_bn():
    return tiny_classifier(widths=(8, 16), norms=(None, None), stride=2)


def run_steps(data_dir: Path, out_dir: Path, env=None) -> dict:
    """Train the BN-free model for 2 steps; return the result and write weights.pt (rank 0)."""
    import torch

    from fixres.config import DataConfig
    from fixres.data.folders import scan_folder
    from fixres.method.train import train
    from fixres.runtime.engine import precision_for

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


def _worker_env() -> dict:
    """The torchrun workers import tests/helpers (tests/ on their path), and the fixres the test runs (PYTHONPATH
    kept); this file's own functions they run as the script."""
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    import torch
    from helpers import write_image_folder
    from helpers.cli import VENV_BIN

    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, seed=3)
    single = tmp_path / "single"
    res = run_steps(data, single)
    assert res["epochs"][-1]["step"] == N_STEPS

    ddp = tmp_path / "ddp"
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed in this environment")
    env = _worker_env()
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


# --------------------------------------------------------------------------- a rank whose images are all unreadable

BLANK_IMAGES = 8  # per rank; repeats 1, epoch length 1 -> 4 samples per rank -> 2 steps of local batch 2


def _tiny_model_with_bn():
    """A batch norm after the first convolution only (its running statistics are checked: keys 1.running_*)."""
    return tiny_classifier(widths=(8, 16), norms=("batch", None), stride=2)


def run_blank_rank(data_dir: Path, out_dir: Path, env=None) -> dict:
    """Rank 0 trains on copies of one photo; under torchrun rank 1 holds only unreadable files, so every
    one of its batches is empty. The single-process reference trains on rank 0's batches alone."""
    import torch

    from fixres.config import DataConfig
    from fixres.method.train import train
    from fixres.runtime.engine import precision_for

    photo = sorted(Path(data_dir).rglob("*.jpg"))[0]
    rank = 0 if env is None else env.rank
    if rank == 0:
        samples = [(str(photo), 0)] * (BLANK_IMAGES if env is not None else BLANK_IMAGES // 2)
    else:
        broken = Path(data_dir).parent / "broken"
        broken.mkdir(exist_ok=True)
        samples = []
        for i in range(BLANK_IMAGES):
            (broken / f"bad_{i}.jpg").write_bytes(b"\xff\xd8\xff not a photo")
            samples.append((str(broken / f"bad_{i}.jpg"), 1))
    model = _tiny_model_with_bn()
    result = train(model, samples, [], DataConfig(train_size=32, num_classes=3), train_size=32, epochs=1,
                   batch_size=GLOBAL_BATCH if env is not None else GLOBAL_BATCH // 2, lr=LR, out_dir=out_dir,
                   repeats=1, epoch_length_factor=1.0, augment="test", env=env,
                   precision=precision_for(torch.device("cpu"), amp=False), seed=7, workers=0, progress=False,
                   max_steps=N_STEPS, model_name="tiny_bn", momentum=0.9, weight_decay=1e-4)
    if env is None or env.is_main:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / "weights.pt")
    return result


@pytest.mark.slow
def test_a_rank_with_only_unreadable_images_contributes_nothing(tmp_path):
    """The blank rank runs no forward (no batch-norm update) and the step is the mean over the
    images that exist: the 2-process result equals one process training on rank 0's batches alone."""
    import torch
    from helpers import write_image_folder
    from helpers.cli import VENV_BIN

    data = write_image_folder(tmp_path / "data", classes=1, per_class=1, seed=4)
    single = tmp_path / "single"
    single.mkdir()
    res = run_blank_rank(data, single)
    assert [r["images"] for r in res["epochs"]] == [2 * (GLOBAL_BATCH // 2)]
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed in this environment")
    ddp = tmp_path / "ddp"
    env = _worker_env()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", __file__, "blank", str(data),
                           str(ddp)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "weights.pt", weights_only=True)
    b = torch.load(ddp / "weights.pt", weights_only=True)
    init = _tiny_model_with_bn().state_dict()
    assert float((a["7.weight"] - init["7.weight"]).abs().max()) > 1e-2, "the steps barely moved the weights"
    assert not torch.equal(a["1.running_mean"], init["1.running_mean"])
    for k in a:  # parameters, and the batch-norm statistics (rank 1 never ran a forward)
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), \
            f"{k} differs: {float((a[k].float() - b[k].float()).abs().max())}"


if __name__ == "__main__":
    from fixres.runtime import dist
    env = dist.init("cpu")
    try:
        if sys.argv[1] == "blank":
            res = run_blank_rank(Path(sys.argv[2]), Path(sys.argv[3]), env=env)
            assert [r["images"] for r in res["epochs"]] == [N_STEPS * GLOBAL_BATCH // 2], res["epochs"]
            assert len(res["skipped"]) == BLANK_IMAGES // 2 or env.rank != 0, res["skipped"]
        else:
            res = run_steps(Path(sys.argv[1]), Path(sys.argv[2]), env=env)
            assert res["epochs"][-1]["step"] == N_STEPS, res["epochs"]
            assert res["hparams"]["world_size"] == 2
    finally:
        dist.shutdown()
