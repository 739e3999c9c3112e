"""Training checkpoints from the ecosystem load: timm's train.py and torchvision's
references/classification/train.py, each with its own default entry, ``--ema`` for the EMA copy, the
pickled ``args`` Namespace allowed and nothing else; random bytes are "not a checkpoint"; NaN/inf
weights are named in a warning, or refused with ``strict``.

The timm checkpoint is written by timm's own ``CheckpointSaver`` (what train.py calls); the torchvision
one by the same dict train.py builds (``references/classification/train.py``, not shipped in the wheel),
with its EMA as an ``AveragedModel`` with buffers, which is what the references' ``ExponentialMovingAverage``
subclasses.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_one_line_error, cli

from fixres.errors import FixresError, UsageError
from fixres.io.checkpoint import load_state_dict
from fixres.models.loading import create_model, load_model

MODEL = "fixres_tiny_resnet"
NUM_CLASSES = 3


class MarkerPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def _trained_pair(seed: int = 0):
    """A tiny model after one SGD step, and an optimizer with state (the real key layout)."""
    torch.manual_seed(seed)
    model = create_model(MODEL, num_classes=NUM_CLASSES)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    return model, opt


def _shift_weights(model: torch.nn.Module, amount: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def timm_checkpoint(tmp_path: Path) -> tuple[Path, dict, dict]:
    """timm train.py: CheckpointSaver(model, optimizer, args, model_ema).save_checkpoint(epoch, metric)."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    model, opt = _trained_pair()
    ema = ModelEmaV3(model, decay=0.9)
    _shift_weights(model)  # the live weights move away from the EMA copy, as after more steps
    args = argparse.Namespace(model="resnet", lr=0.1, epochs=2, batch_size=4, input_size=None, mean=None,
                              model_ema=True, model_ema_decay=0.9, output=str(tmp_path))
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(tmp_path / "timm"),
                            recovery_dir=str(tmp_path / "timm"), max_history=2)
    (tmp_path / "timm").mkdir()
    saver.save_checkpoint(epoch=1, metric=42.0)
    path = tmp_path / "timm" / "last.pth.tar"
    return path, {k: v.clone() for k, v in model.state_dict().items()}, \
        {k: v.clone() for k, v in ema.module.state_dict().items()}


def torchvision_checkpoint(tmp_path: Path, *, with_ema: bool = True) -> tuple[Path, dict, dict | None]:
    """torchvision references/classification/train.py: the dict it passes to utils.save_on_master."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    model, opt = _trained_pair(seed=1)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    model_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) if with_ema else None
    if model_ema is not None:
        model_ema.update_parameters(model)  # the first update copies; the second one averages
    _shift_weights(model)
    if model_ema is not None:
        model_ema.update_parameters(model)
    args = argparse.Namespace(data_path="/data/imagenet", model="resnet50", device="cuda", batch_size=32, epochs=90,
                              lr=0.5, model_ema=with_ema, model_ema_steps=32, model_ema_decay=0.99998,
                              train_crop_size=176, val_resize_size=232, val_crop_size=224, weights=None,
                              output_dir=str(tmp_path), amp=False, distributed=False)
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                  "epoch": 5, "args": args}
    if model_ema is not None:
        checkpoint["model_ema"] = model_ema.state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    ema_sd = None if model_ema is None else {k: v.clone() for k, v in model_ema.module.state_dict().items()}
    return path, {k: v.clone() for k, v in model.state_dict().items()}, ema_sd


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("make", [timm_checkpoint, torchvision_checkpoint])
def test_training_checkpoints_load_their_default_and_ema_weights(tmp_path, make):
    path, plain, ema = make(tmp_path)
    raw = torch.load(path, weights_only=False)
    assert isinstance(raw["args"], argparse.Namespace)  # the real layout, args included
    assert _differs(plain, ema)  # so picking the wrong entry is visible
    _assert_same(load_state_dict(path), plain)  # each format's own default: model / state_dict
    _assert_same(load_state_dict(path, ema=True), ema)  # n_averaged and module. dropped for torchvision
    bundle = load_model(model=MODEL, checkpoint=str(path))
    _assert_same(bundle.model.state_dict(), plain)
    bundle = load_model(model=MODEL, checkpoint=str(path), ema=True)
    _assert_same(bundle.model.state_dict(), ema)


def test_ema_flag_on_a_checkpoint_without_ema_is_a_usage_error(tmp_path):
    path, plain, _ = torchvision_checkpoint(tmp_path, with_ema=False)
    _assert_same(load_state_dict(path), plain)
    with pytest.raises(UsageError, match="no EMA weights"):
        load_state_dict(path, ema=True)


def test_cli_ema_flag(capsys, tmp_path, image_folder):
    path, _, _ = torchvision_checkpoint(tmp_path)
    base = ["--model", MODEL, "--checkpoint", path, "--data", image_folder, "--test-size", "32", "--workers", "0",
            "--no-amp", "--json"]
    import json
    code, out, err = cli(capsys, "eval", *base, "--out", tmp_path / "plain")
    assert code == 0, err
    code_ema, out_ema, err_ema = cli(capsys, "eval", *base, "--ema", "--out", tmp_path / "ema")
    assert code_ema == 0, err_ema
    # Different weights, different losses: --ema really switched the entry.
    assert json.loads(out)["rows"][0]["loss"] != json.loads(out_ema)["rows"][0]["loss"]


def test_namespace_is_the_only_extra_type(tmp_path):
    """The allowlist is exactly argparse.Namespace: a payload inside the Namespace is still refused."""
    marker = tmp_path / "marker"
    path, plain, _ = torchvision_checkpoint(tmp_path, with_ema=False)
    ck = torch.load(path, weights_only=False)
    ck["args"].hook = MarkerPayload(marker)
    torch.save(ck, path)
    with pytest.raises(FixresError, match="refused.*could run code"):
        load_state_dict(path)
    assert not marker.exists()
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # nothing leaked into torch's global list


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    """Seeded draws (an unseeded one once hit an IndexError inside torch's legacy loader, which then
    read "list index out of range"): random data, data that starts like a pickle or a torch zip."""
    for seed in range(60):
        rng = random.Random(seed)
        for name, data in (("random.pth", rng.randbytes(4096)), ("pickle_like.pth", b"\x80\x02" + rng.randbytes(512)),
                           ("zip_like.pth", b"PK\x03\x04" + rng.randbytes(512))):
            path = tmp_path / name
            path.write_bytes(data)
            with pytest.raises(FixresError) as info:
                load_state_dict(path)
            msg = str(info.value)
            assert "not a checkpoint" in msg and "could run code" not in msg and "\n" not in msg, (seed, name, msg)


# --------------------------------------------------------------------------- non-finite weights


def _poisoned(tmp_path: Path) -> tuple[Path, list[str]]:
    path, plain, _ = torchvision_checkpoint(tmp_path, with_ema=False)
    sd = dict(plain)
    bad = ["conv1.weight", "fc.bias"]
    sd[bad[0]] = sd[bad[0]].clone()
    sd[bad[0]][0, 0, 0, 0] = float("nan")
    sd[bad[1]] = sd[bad[1]].clone()
    sd[bad[1]][0] = float("inf")
    torch.save({"model": sd}, path)
    return path, bad


def test_non_finite_weights_warn_naming_the_tensors(tmp_path, capsys):
    path, bad = _poisoned(tmp_path)
    load_model(model=MODEL, checkpoint=str(path))
    err = capsys.readouterr().err
    assert "warning" in err and "2 tensor(s) hold NaN or infinity" in err
    assert all(name in err for name in bad) and "layer1" not in err


def test_non_finite_weights_refused_when_strict(tmp_path, capsys, image_folder):
    path, bad = _poisoned(tmp_path)
    with pytest.raises(FixresError) as info:
        load_model(model=MODEL, checkpoint=str(path), strict=True)
    assert all(name in str(info.value) for name in bad) and "\n" not in str(info.value)
    code, out, err = cli(capsys, "eval", "--model", MODEL, "--checkpoint", path, "--data", image_folder,
                         "--test-size", "32", "--workers", "0", "--strict", "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "NaN or infinity", "conv1.weight")


@pytest.mark.parametrize("extra", [getattr, argparse.ArgumentParser, os.path.join], ids=["getattr", "ArgumentParser",
                                                                                        "os.path.join"])
def test_any_global_but_the_namespace_is_refused(tmp_path, extra):
    """Beside the tensors and the Namespace, a reference to any other global (even one that runs nothing
    by itself) makes the file refused: the allowlist is exactly argparse.Namespace, not 'harmless-looking'."""
    torch.manual_seed(0)
    path = tmp_path / "ck.pth"
    torch.save({"state_dict": create_model(MODEL, num_classes=NUM_CLASSES)[0].state_dict(),
                "args": argparse.Namespace(model=MODEL), "extra": extra}, path)
    with pytest.raises(FixresError, match="refused"):
        load_state_dict(path)
    # the same file without the extra global loads: it is the global, not the layout, that is refused
    ok = torch.load(path, weights_only=False)
    del ok["extra"]
    torch.save(ok, path)
    assert set(load_state_dict(path)) == set(create_model(MODEL, num_classes=NUM_CLASSES)[0].state_dict())
