"""Training at low resolution: schedule, a real tiny run, export, transfer, SIGKILL + resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_resnet, write_image_folder
from helpers.cli import VENV_BIN

from fixres.errors import UsageError
from fixres.io.checkpoint import load_state_dict, load_training_state, save_safetensors
from fixres.method import analysis
from fixres.method.trainrecipe import default_lr, lr_factor

#: One intra-op thread: bitwise-reproducible CPU kernels, and far faster on a busy 2-core machine.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "data"
    write_image_folder(root / "train", classes=3, per_class=8, seed=1)
    write_image_folder(root / "val", classes=3, per_class=2, seed=2)
    return root


def _cli(argv: list) -> int:
    from fixres.cli.app import main
    return main([str(a) for a in argv])


# --------------------------------------------------------------------------- schedule


def test_paper_lr_and_step_schedule():
    assert default_lr(256) == pytest.approx(0.1)
    assert default_lr(512) == pytest.approx(0.2)
    spe = 10
    f = [lr_factor(s, steps_per_epoch=spe, epochs=120, schedule="step") for s in (0, 299, 300, 599, 600, 900)]
    assert f == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.001])
    # The step interval is a parameter.
    assert lr_factor(50, steps_per_epoch=10, epochs=20, schedule="step", step_epochs=5) == pytest.approx(0.1)


def test_cosine_and_warmup():
    spe, epochs = 10, 10
    kw = dict(steps_per_epoch=spe, epochs=epochs, schedule="cosine", warmup_epochs=2)
    warm = [lr_factor(s, **kw) for s in range(20)]
    assert warm[0] == pytest.approx(1 / 20) and warm[19] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert lr_factor(20, **kw) == pytest.approx(1.0)
    assert lr_factor(20 + 40, **kw) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(99, **kw) < 0.01
    with pytest.raises(UsageError):
        lr_factor(0, steps_per_epoch=1, epochs=1, schedule="linear")


# --------------------------------------------------------------------------- a real run


def test_cli_train_validates_at_train_and_recommended_size_and_exports(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _cli(["train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", "32", "--epochs", "2",
               "--batch-size", "8", "--workers", "0", "--lr", "0.05", "--out", out, "--json", "-q",
               "--schedule", "cosine", "--warmup-epochs", "1", "--label-smoothing", "0.1", "--color-jitter"])
    assert rc == 0
    import json
    result = json.loads(capsys.readouterr().out)
    rec = analysis.recommend_test_size(train_size=32, crop_ratio=0.875)["test_size"]
    assert result["test_size"] == rec
    assert result["num_classes"] == 3 and result["transfer"] is False
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        # 24 images, repeats 3: the paper's epoch draws 2N = 48 samples (official RASampler len_factor=2),
        # in full batches of 8.
        assert r["images"] == 48 and r["step"] == 6 * r["epoch"]
        assert set(r["val_top1"]) == {"32", str(rec)}
        assert r["val_top1_train_size"] == r["val_top1"]["32"] and r["val_top1_test_size"] == r["val_top1"][str(rec)]
        assert r["val_n"] == 6 and all(v * 6 / 100 == pytest.approx(round(v * 6 / 100)) for v in r["val_top1"].values())
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["images_per_s"] > 0
        assert math.isfinite(r["train_loss"])
    # Warm-up then cosine: the last lr is below the peak.
    assert log[-1]["lr"] < 0.05
    assert result["hparams"]["lr"] == 0.05 and result["hparams"]["label_smoothing"] == 0.1

    # The export reloads with no other flag and computes what the trained model computes.
    from fixres.models.loading import load_model
    bundle = load_model(checkpoint=str(out / "model.safetensors"))
    assert bundle.name == "fixres_tiny_resnet" and bundle.data_config.train_size == 32
    assert list(bundle.data_config.class_names) == ["class_0", "class_1", "class_2"]
    state = load_training_state(out / "train_state.pt")
    assert state["epoch"] == 2
    for k, v in load_state_dict(out / "model.safetensors").items():
        assert torch.equal(v, state["model"][k])
    # The logged validation numbers are those the export scores on the same images (fixres eval's numbers).
    from fixres.data.folders import scan_folder
    from fixres.method.evaluate import evaluate
    from fixres.runtime.engine import Precision
    res = evaluate(bundle.model.eval(), scan_folder(data / "val").samples, bundle.data_config, test_sizes=[32, rec],
                   crop_ratios=[0.875], batch_size=8, workers=0, progress=False,
                   precision=Precision(False, None, False))
    assert {str(row.test_size): row.top1 for row in res.rows} == pytest.approx(log[-1]["val_top1"])

    # An existing run is not overwritten by accident.
    with pytest.raises(UsageError, match="--resume"):
        from fixres.method.train import train
        train(bundle.model, [], [], bundle.data_config, train_size=32, epochs=1, batch_size=8, out_dir=out,
              model_name="x")


def test_transfer_makes_a_new_head_and_trains_the_whole_network(tmp_path):
    from fixres.models.loading import load_model
    data = tmp_path / "data"
    write_image_folder(data / "train", classes=3, per_class=5, seed=4)  # + 1 broken = 16 = 2 full batches
    write_image_folder(data / "val", classes=3, per_class=1, seed=5)
    bad = data / "train" / "class_1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    torch.manual_seed(1)
    pre = load_model(model="fixres_tiny_resnet", num_classes=5).model
    ck = save_safetensors(pre.state_dict(), tmp_path / "pretrained5.safetensors")
    out = tmp_path / "transfer"
    from fixres.cli.train import TrainRunConfig, run_training
    from fixres.runtime.dist import DistEnv
    rc = TrainRunConfig(model="fixres_tiny_resnet", checkpoint=str(ck), weights=None, num_classes=None,
                        class_map=None, data=str(data), out=str(out), train_size=32, epochs=1, batch_size=8,
                        lr=0.05, schedule="step", step_epochs=30, warmup_epochs=0, label_smoothing=0.0,
                        momentum=0.9, weight_decay=1e-4, repeats=1, color_jitter=False, augment="control",
                        val_sizes=[32], resume=False, device="cpu", workers=0, amp=False, seed=0, max_steps=None,
                        progress=False, overrides={})
    result = run_training(rc, DistEnv())
    assert result["transfer"] and result["new_head"] == 3
    # An unreadable photo is skipped and named, not fatal.
    assert [item["path"] for item in result["skipped"]] == [str(bad)]
    after = load_state_dict(out / "model.safetensors")
    assert after["fc.weight"].shape == (3, 128)
    before = pre.state_dict()
    # Section 5.3: every layer trains, not only the head.
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.0.conv2.weight"):
        assert not torch.allclose(before[name], after[name]), f"{name} was frozen"


def test_resume_refuses_other_hyper_parameters(data, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", "32", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--out", out, "-q", "--val-sizes", "32", "--no-amp"]
    assert _cli(base) == 0
    capsys.readouterr()
    assert _cli([*base, "--resume", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other settings: batch_size=8 (now 4)" in err
    assert _cli([*base, "--resume", "--mean", "0.5,0.5,0.5"]) == 2  # other pre-processing
    assert "mean=[0.485, 0.456, 0.406] (now [0.5, 0.5, 0.5])" in capsys.readouterr().err
    assert _cli([*base, "--resume", "--epoch-length-factor", "1"]) == 2  # repeats 3: the paper's 2N by default
    assert "epoch_length_factor=2.0 (now 1.0)" in capsys.readouterr().err
    assert _cli([*base, "--resume"]) == 0  # same flags: nothing left to do, the model is rewritten
    assert load_training_state(out / "train_state.pt")["epoch"] == 1


# --------------------------------------------------------------------------- SIGKILL + resume


def _fixres(argv, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "fixres"), *map(str, argv)], env=ONE_THREAD_ENV,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_after_an_epoch_then_resume_equals_uninterrupted(data, tmp_path):
    epochs = 5
    common = ["train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", "32", "--epochs", epochs,
              "--batch-size", "4", "--workers", "0", "--seed", "3", "--device", "cpu", "-q", "--lr", "0.05",
              "--val-sizes", "32"]
    run_out, ref_out = tmp_path / "run", tmp_path / "ref"
    proc = _fixres([*common, "--out", run_out], tmp_path / "run.log")
    deadline = time.monotonic() + 180
    while not (run_out / "train_state.pt").exists():
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_training_state(run_out / "train_state.pt")["epoch"]
    assert 1 <= killed_at < epochs and not (run_out / "model.safetensors").exists()

    # The uninterrupted reference runs in this process (same code, same single thread, same seeds).
    assert _cli([*common, "--out", ref_out]) == 0
    resumed = _fixres([*common, "--out", run_out, "--resume"], tmp_path / "resume.log")
    assert resumed.wait(timeout=180) == 0, (tmp_path / "resume.log").read_text()[-2000:]

    a, b = load_state_dict(ref_out / "model.safetensors"), load_state_dict(run_out / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    import json
    log = [json.loads(line) for line in (run_out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))


def test_usage_errors_are_one_line(data, tmp_path, capsys):
    assert _cli(["train", "--data", data, "--train-size", "32", "--out", tmp_path / "a"]) == 2  # no model
    assert "--model" in capsys.readouterr().err
    assert _cli(["train", "--model", "fixres_tiny_resnet", "--data", tmp_path / "missing", "--train-size", "32",
                 "--out", tmp_path / "b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "\n" not in err


# --------------------------------------------------------------------------- arguments and resume paths


def _train_kw(data, out, **kw):
    from fixres.data.folders import scan_folder
    from fixres.runtime.engine import Precision
    return dict(train_samples=scan_folder(data / "train").samples, val_samples=[], train_size=32, epochs=1,
                batch_size=8, out_dir=out, workers=0, progress=False, precision=Precision(False, None, False),
                model_name="fixres_tiny_resnet", **kw)


@pytest.mark.parametrize("kw, message", [
    ({"augment": "mixup"}, "unknown training augmentation 'mixup'"),
    ({"schedule": "linear"}, "unknown schedule 'linear'"),
    ({"epochs": 0}, "epochs must be positive, got 0"),
    ({"batch_size": 0}, "--batch-size 0 (global) must be a positive multiple"),
    ({"label_smoothing": 1.0}, "label smoothing must be in [0, 1), got 1.0"),
    ({"epoch_length_factor": 0.0}, "epoch length factor must be a positive number, got 0.0"),
    ({"epoch_length_factor": float("nan")}, "epoch length factor must be a positive number, got nan"),
    ({"optimizer": "adam"}, "unknown optimizer 'adam'; choose one of sgd, adamw"),
])
def test_train_refuses_bad_arguments_before_writing(data, tmp_path, kw, message):
    from fixres.method.train import train
    bundle = tiny_resnet()
    args = _train_kw(data, tmp_path / "o")
    args.update(kw)
    with pytest.raises(UsageError) as err:
        train(bundle.model, cfg=bundle.data_config, **args)
    assert message in str(err.value)
    assert not (tmp_path / "o").exists()


def test_paper_epoch_length_is_the_default_only_with_repeated_augmentation(data, tmp_path):
    """Repeats 3 -> 2N samples an epoch (official RASampler len_factor=2); repeats 1 -> N."""
    from fixres.method.train import train
    res = train(tiny_resnet().model, cfg=tiny_resnet().data_config, repeats=1, **_train_kw(data, tmp_path / "r1"))
    assert res["hparams"]["epoch_length_factor"] == 1.0 and res["epochs"][0]["images"] == 24
    res = train(tiny_resnet().model, cfg=tiny_resnet().data_config, repeats=3, epoch_length_factor=0.5,
                **_train_kw(data, tmp_path / "half"))
    assert res["epochs"][0]["images"] == 8  # ceil(0.5 x 24) = 12 samples -> one full batch of 8


def test_help_documents_the_epoch_length_and_the_official_parts(capsys):
    assert _cli(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--epoch-length-factor" in text and "default: 2 with repeated augmentation" in text
    assert "RASampler(len_factor=2.0)" in text
    assert _cli(["finetune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "official FixRes code trains only fc" in text and "--parts classifier,bn-stats" in text


def test_cosine_resume_with_another_epoch_count_is_refused(data, tmp_path):
    from fixres.method.train import train
    out = tmp_path / "cos"
    train(tiny_resnet().model, cfg=tiny_resnet().data_config, schedule="cosine", **_train_kw(data, out))
    with pytest.raises(UsageError, match=r"other settings: epochs=1 \(now 2\)"):
        train(tiny_resnet().model, cfg=tiny_resnet().data_config, schedule="cosine", resume=True,
              **{**_train_kw(data, out), "epochs": 2})
    # a step schedule may be extended: the same run continues for one more epoch
    step_out = tmp_path / "step"
    train(tiny_resnet().model, cfg=tiny_resnet().data_config, **_train_kw(data, step_out))
    res = train(tiny_resnet().model, cfg=tiny_resnet().data_config, resume=True,
                **{**_train_kw(data, step_out), "epochs": 2})
    assert res["resumed_from"] == 1 and [r["epoch"] for r in res["epochs"]] == [1, 2]


def test_train_resume_into_a_model_it_does_not_fit_is_a_clear_error(data, tmp_path):
    from fixres.method.train import train
    out = tmp_path / "o"
    train(tiny_resnet().model, cfg=tiny_resnet().data_config, **_train_kw(data, out))
    five = tiny_resnet(num_classes=5)
    with pytest.raises(UsageError, match=r"does not fit this model \(fc\.weight: \(3, 128\) vs \(5, 128\) here\)"):
        train(five.model, cfg=five.data_config, resume=True, **_train_kw(data, out))


# --------------------------------------------------------------------------- model flags (through model_spec)

def _nan_checkpoint(tmp_path: Path) -> tuple[Path, str]:
    from fixres.models.loading import load_model
    sd = load_model(model="fixres_tiny_resnet", num_classes=3).model.state_dict()
    sd["fc.bias"] = sd["fc.bias"].clone()
    sd["fc.bias"][0] = float("nan")
    return save_safetensors(sd, tmp_path / "nan.safetensors"), "fc.bias"


def test_train_strict_refuses_a_nan_checkpoint_and_warns_without(tmp_path, capsys, data):
    ck, bad = _nan_checkpoint(tmp_path)
    common = ["train", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", data, "--train-size", 32,
              "--epochs", 1, "--batch-size", 8, "--workers", 0, "--no-amp", "-q", "--max-steps", 1]
    assert _cli(common + ["--strict", "--out", tmp_path / "strict"]) == 2  # bad input
    err = capsys.readouterr().err
    assert bad in err and "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "strict" / "model.safetensors").exists()
    # without --strict the same checkpoint loads with a warning naming the tensor; its loss is then not a
    # number, so training stops in one line before anything is exported
    assert _cli(common + ["--out", tmp_path / "lenient"]) == 2
    err = capsys.readouterr().err
    assert "warning" in err and bad in err and "diverged in epoch 1" in err and "Traceback" not in err
    assert not (tmp_path / "lenient" / "model.safetensors").exists()


def test_train_flags_reach_load_model(tmp_path, monkeypatch, data):
    """--ema/--strict/--pretrained go through commands._args.model_spec into load_model, like every command."""
    import fixres.models.loading as models
    seen = {}
    real = models.load_model

    def spy(**kw):
        seen.update(kw)
        return real(**{**kw, "pretrained": False, "ema": False})

    monkeypatch.setattr(models, "load_model", spy)
    argv = ["train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", 32, "--epochs", 1,
            "--batch-size", 8, "--workers", 0, "--no-amp", "-q", "--max-steps", 1, "--out", tmp_path / "o"]
    assert _cli(argv + ["--ema", "--strict"]) == 0
    assert seen["ema"] is True and seen["strict"] is True and seen["pretrained"] is False
    assert seen["num_classes"] == 3 and seen["train_size"] == 32
    assert _cli(argv + ["--pretrained"]) == 0
    assert seen["pretrained"] is True


def test_adamw_trains_with_adam_moments_and_deits_default_rate(data, tmp_path):
    """--optimizer adamw (ViT/ConvNeXt recipes): AdamW's moment estimates in the saved state, lr 5e-4 x B/512."""
    from fixres.method.train import train
    res = train(tiny_resnet().model, cfg=tiny_resnet().data_config, repeats=1, optimizer="adamw",
                **_train_kw(data, tmp_path / "adamw"))
    assert res["hparams"]["optimizer"] == "adamw" and res["hparams"]["lr"] == pytest.approx(5e-4 * 8 / 512)
    opt = load_training_state(tmp_path / "adamw" / "train_state.pt")["optimizer"]
    assert all("exp_avg_sq" in st for st in opt["state"].values()) and opt["state"]
    sgd = train(tiny_resnet().model, cfg=tiny_resnet().data_config, repeats=1, **_train_kw(data, tmp_path / "sgd"))
    assert "optimizer" not in sgd["hparams"] and sgd["hparams"]["lr"] == pytest.approx(default_lr(8))
    opt = load_training_state(tmp_path / "sgd" / "train_state.pt")["optimizer"]
    assert all("momentum_buffer" in st for st in opt["state"].values())
