"""Numbers a user can trust: the same seed gives the same numbers whatever the worker count, a diverging run
stops with one line, flag values that cannot give finite numbers are refused, and broken files give one
line naming what is wrong. Tiny models and generated photos, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint, tiny_resnet, write_image_folder
from helpers.cli import assert_one_line_error, cli

from fixres.config import MAX_SIZE


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("numbers") / "data"
    write_image_folder(root / "train", classes=2, per_class=6, seed=1)
    write_image_folder(root / "val", classes=2, per_class=2, seed=2)
    return root


def _train(data: Path, out: Path, **kw) -> dict:
    from fixres.data.folders import scan_folder
    from fixres.method.train import train
    from fixres.runtime.engine import Precision
    bundle = tiny_resnet(num_classes=2)
    args = dict(train_samples=scan_folder(data / "train").samples, val_samples=[], train_size=32, epochs=1,
                batch_size=4, out_dir=out, workers=0, progress=False, precision=Precision(False, None, False),
                model_name="fixres_tiny_resnet", lr=0.05, seed=3)
    args.update(kw)
    train(bundle.model, cfg=bundle.data_config, **args)
    return {k: v.clone() for k, v in bundle.model.state_dict().items()}


# --------------------------------------------------------------------------- same seed, same numbers


def test_same_seed_same_weights_whatever_the_worker_count(data, tmp_path):
    """Augmentations are drawn per sample from (seed, epoch, position), not from a worker's stream."""
    base = _train(data, tmp_path / "w0", workers=0)
    other = _train(data, tmp_path / "w2", workers=2)
    assert base.keys() == other.keys()
    diff = {k: float((base[k].double() - other[k].double()).abs().max()) for k in base}
    assert all(d == 0.0 for d in diff.values()), {k: d for k, d in diff.items() if d}
    # ... and the seed still matters: another seed, other weights.
    moved = _train(data, tmp_path / "s4", workers=0, seed=4)
    assert any(not torch.equal(base[k], moved[k]) for k in base if base[k].is_floating_point())


def test_repeated_copies_of_a_photo_get_their_own_augmentation():
    from fixres.method.sampler import RepeatedAugSampler, SeededSamples

    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i, float(torch.rand(()))

    sampler = RepeatedAugSampler(4, repeats=3, seed=0, keyed=True)
    ds = SeededSamples(Draw(), seed=0)
    draws = [ds[key] for key in sampler]
    first = [d for i, d in draws if i == draws[0][0]]
    assert len(first) == 3 and len(set(first)) == 3
    before = torch.get_rng_state()
    sampler.set_epoch(1)
    assert [ds[key] for key in sampler] != draws  # another epoch, other draws
    assert torch.equal(torch.get_rng_state(), before)  # the reader's own stream is left as it was


@pytest.mark.parametrize("command", ["sweep", "eval"])
def test_seed_fixes_the_random_initialisation(command, tmp_path, capsys):
    val = write_image_folder(tmp_path / "val", classes=2, per_class=3, seed=5)
    sizes = ["--test-sizes", "32"] if command == "sweep" else ["--test-size", "32"]
    extra = ["--no-plot"] if command == "sweep" else []

    def run(seed: int, out: str) -> list:
        code, stdout, err = cli(capsys, command, "--model", "fixres_tiny_resnet", "--random-init", "--num-classes",
                                2, "--seed", seed, "--data", val, *sizes, *extra, "--no-amp", "--device", "cpu",
                                "--workers", 0, "--json", "-q", "--out", tmp_path / out)
        assert code == 0, err
        rows = json.loads(stdout)["rows"]
        return [(r["top1"], r["loss"]) for r in rows]

    assert run(7, "a") == run(7, "b")
    assert run(7, "a") != run(8, "c")


# --------------------------------------------------------------------------- one rule for seeds and sizes


@pytest.mark.parametrize("command", [
    ["analyze"],
    ["make-dataset", "--classes", "2", "--train-per-class", "1", "--val-per-class", "1"],
    ["eval", "--data", "D", "--model", "fixres_tiny_resnet", "--random-init"],
    ["train", "--data", "D", "--model", "fixres_tiny_resnet", "--train-size", "32"],
])
@pytest.mark.parametrize("value", ["-1", str(2 ** 32), "1.5"])
def test_every_command_takes_seeds_by_one_rule(command, value, tmp_path, capsys):
    code, _, err = cli(capsys, *command, "--seed", value, "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "--seed")
    assert not (tmp_path / "o").exists()


def test_the_largest_seed_is_taken():
    from fixres.cli.args import seed
    assert seed(str(2 ** 32 - 1)) == 2 ** 32 - 1 and seed("0") == 0


@pytest.mark.parametrize("argv", [
    ["eval", "--data", "D", "--model", "fixres_tiny_resnet", "--random-init", "--test-size", str(MAX_SIZE + 1)],
    ["train", "--data", "D", "--model", "fixres_tiny_resnet", "--train-size", "5000"],
    ["finetune", "--data", "D", "--model", "fixres_tiny_resnet", "--test-size", "4097"],
    ["analyze", "--train-size", str(MAX_SIZE + 1)],
    ["sweep", "--data", "D", "--model", "fixres_tiny_resnet", "--test-sizes", f"128,{MAX_SIZE + 32}"],
])
def test_sizes_above_the_limit_are_refused_in_one_line(argv, capsys):
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, f"largest supported size {MAX_SIZE}")


def test_analyze_refuses_more_samples_than_its_limit(capsys):
    from fixres.cli.analyze import MAX_SAMPLES
    code, _, err = cli(capsys, "analyze", "--samples", str(MAX_SAMPLES * 10))
    assert code == 2
    assert_one_line_error(err, "--samples", str(MAX_SAMPLES))
    code, _, err = cli(capsys, "analyze", "--samples", "1e11")
    assert code == 2
    assert_one_line_error(err, "--samples")


def test_the_library_refuses_sizes_above_the_limit():
    from fixres.config import DataConfig, resize_for
    from fixres.errors import UsageError
    with pytest.raises(UsageError, match=f"largest supported size {MAX_SIZE}"):
        resize_for(MAX_SIZE + 1, 0.875)
    with pytest.raises(UsageError, match="train_size"):
        DataConfig(train_size=100_000)
    assert resize_for(MAX_SIZE, 1.0) == MAX_SIZE


# --------------------------------------------------------------------------- a diverging run stops


def _train_cli(capsys, data, out, *extra):
    return cli(capsys, "train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", 32, "--epochs", 2,
               "--batch-size", 4, "--repeats", 1, "--workers", 0, "--no-amp", "--device", "cpu", "--val-sizes", 32,
               "-q", "--out", out, *extra)


def test_a_diverging_training_stops_in_one_line_naming_the_epoch_and_the_lr(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _train_cli(capsys, data, out, "--lr", "1e30")
    assert code == 2, err
    assert_one_line_error(err, "diverged in epoch 1", "learning rate 1e+30", "--lr")
    assert not (out / "model.safetensors").exists()  # no model of NaNs is exported
    for line in (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))


def test_one_absurd_step_whose_loss_was_finite_still_stops_before_export(data, tmp_path, capsys):
    """A single step at lr 1e30 leaves every weight finite but near 1e29: the step's loss was finite, the next
    forward overflows. The probe forward after the epoch catches it; nothing is exported."""
    out = tmp_path / "one_step"
    code, _, err = cli(capsys, "train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", 32,
                       "--epochs", 1, "--lr", "1e30", "--batch-size", 64, "--workers", 0, "--no-amp", "-q",
                       "--out", out)
    assert code == 2, err
    assert_one_line_error(err, "diverged in epoch 1", "outputs are not finite")
    assert not (out / "model.safetensors").exists()


def test_a_diverging_finetune_stops_in_one_line(data, tmp_path, capsys):
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors", num_classes=2)
    code, _, err = cli(capsys, "finetune", "--checkpoint", ck, "--model", "fixres_tiny_resnet", "--data", data,
                       "--test-size", 32, "--epochs", 1, "--lr", "1e30", "--batch-size", 4, "--workers", 0,
                       "--no-amp", "--device", "cpu", "-q", "--no-export", "--out", tmp_path / "ft")
    assert code == 2, err
    assert_one_line_error(err, "fine-tuning diverged in epoch 1", "learning rate 1e+30")
    assert "RuntimeWarning" not in err


def test_log_lines_stay_json_when_a_number_is_not_finite(tmp_path):
    from fixres.io.atomic import append_jsonl
    append_jsonl(tmp_path / "log.jsonl", {"loss": float("nan"), "rows": [float("inf"), 1.5], "n": 3})
    line = (tmp_path / "log.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {"loss": None, "rows": [None, 1.5], "n": 3}


# --------------------------------------------------------------------------- broken numbers in a run folder


def _candidate(size: int, before: float, after: float) -> dict:
    scores = {"top1_std": 2.0, "nll": 0.9, "ece": 4.0, "n": 40}
    return {"test_size": size, "ms": 1.5, "ms_batch": 0.5, "batch": 8, "gflops": 0.2, "holdout_before": None,
            "holdout_after": {"top1": after - 1, **scores}, "finetune_s": 3.0,
            "val_before": {"top1": before, **scores}, "val_after": {"top1": after, **scores}}


@pytest.mark.parametrize("where", ["size", "top1", "cost", "block", "top"])
def test_broken_numbers_in_select_json_never_stop_the_report(tmp_path, capsys, where):
    from helpers import fake_run_dir

    from fixres.io.atomic import write_json
    run = fake_run_dir(tmp_path / "run")
    cands = [_candidate(64, 60.0, 70.0), _candidate(96, 62.0, 74.0)]
    if where == "size":
        cands[0]["test_size"] = "sixty-four"
    elif where == "top1":
        cands[0]["val_after"]["top1"] = "abc"
    elif where == "cost":
        cands[1]["ms"], cands[1]["gflops"] = "fast", [1, 2]
    elif where == "block":
        cands[1]["val_before"] = "n/a"
    write_json(run / "select.json", {"method": "holdout", "rule": "most-accurate", "candidates": cands,
                                     "dropped": [], "n_holdout": "ten" if where == "top" else 10,
                                     "recommended": "x" if where == "top" else 96})
    code, _, err = cli(capsys, "report", run)
    assert code == 0, err
    page = (run / "report" / "index.html").read_text(encoding="utf-8")
    assert "Traceback" not in err and "74.0" in page


# --------------------------------------------------------------------------- one line naming the cause


def test_a_nan_checkpoint_names_the_first_layer_whose_output_is_not_finite(tmp_path, capsys):
    from fixres.io.checkpoint import load_state_dict as read
    from fixres.io.checkpoint import save_safetensors
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors", num_classes=2)
    sd = read(str(ck))
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_safetensors(sd, tmp_path / "nan.safetensors")
    val = write_image_folder(tmp_path / "val", classes=2, per_class=2)
    code, _, err = cli(capsys, "eval", "--checkpoint", tmp_path / "nan.safetensors", "--model", "fixres_tiny_resnet",
                       "--data", val, "--test-size", 32, "--workers", 0, "--no-amp", "-q", "--out", tmp_path / "o")
    assert code == 2, err
    assert_one_line_error(err, "layer1.0.conv1", "not numbers", "--strict")
    assert "RuntimeWarning" not in err and not (tmp_path / "o" / "eval.json").exists()


@pytest.mark.parametrize("flag, value, phrase", [("--mean", "1e39,0.5,0.5", "[0, 1] units"),
                                                 ("--std", "1e-45,0.2,0.2", "at least 0.001"),
                                                 ("--std", "0.2,0.2,1e9", "[0, 1] units")])
def test_normalisation_that_cannot_give_finite_inputs_is_refused_at_parse_time(flag, value, phrase, capsys):
    code, _, err = cli(capsys, "eval", "--data", "D", "--model", "fixres_tiny_resnet", "--random-init", flag, value)
    assert code == 2
    assert_one_line_error(err, flag, phrase)


def test_a_classifier_of_another_width_names_the_feature_width(tmp_path, capsys):
    from fixres.io.checkpoint import load_state_dict as read
    from fixres.io.checkpoint import save_safetensors
    sd = read(str(save_tiny_checkpoint(tmp_path / "tiny.safetensors", num_classes=2)))
    sd["fc.weight"] = torch.zeros(2, 7)
    save_safetensors(sd, tmp_path / "narrow.safetensors")
    val = write_image_folder(tmp_path / "val", classes=2, per_class=2)
    code, _, err = cli(capsys, "eval", "--checkpoint", tmp_path / "narrow.safetensors", "--model",
                       "fixres_tiny_resnet", "--data", val, "--workers", 0, "-q", "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "reads 7 features", "128 in the model", "--model")


def test_wnid_shaped_folders_outside_imagenet_are_one_line(tmp_path, capsys):
    val = write_image_folder(tmp_path / "val", classes=2, per_class=2)
    for i, folder in enumerate(sorted(val.iterdir())):
        folder.rename(val / f"n0000000{i + 1}")
    code, _, err = cli(capsys, "eval", "--model", "resnet10t", "--random-init", "--data", val, "--test-size", 32,
                       "--workers", 0, "-q", "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "n00000001", "not one of the 1000 ImageNet classes", "--class-map", "--num-classes")


def test_a_pickle_of_another_protocol_is_named_without_torch_warnings(tmp_path, capsys, recwarn):
    torch.save(tiny_resnet(num_classes=2).model.state_dict(), tmp_path / "p4.pt", pickle_protocol=4)
    val = write_image_folder(tmp_path / "val", classes=2, per_class=2)
    code, _, err = cli(capsys, "eval", "--checkpoint", tmp_path / "p4.pt", "--model", "fixres_tiny_resnet",
                       "--data", val, "--workers", 0, "-q", "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "protocol 4", "re-save", "safetensors")
    assert "damaged" not in err and not [w for w in recwarn.list if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 960"),
    OSError(28, "No space left on device"),
])
def test_a_full_disk_during_training_says_so_and_where(data, tmp_path, capsys, monkeypatch, failure):
    """The training state is the first large write of an epoch; torch's zip writer or the OS refuses it."""
    def full(*_a, **_k):
        raise failure
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code, _, err = _train_cli(capsys, data, out)
    assert code == 2, err
    assert_one_line_error(err, "disk is full", str(out))
    assert "enforce fail" not in err
