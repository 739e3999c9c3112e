"""Result files and data folders under failure: an export replaced whole or not at all, a command's result files
all of one run, --out never inside --data nor unwritable, split-shaped roots, one photo one label, a content-aware
data fingerprint, and an output lock that dies with its process."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import MODEL_COMMANDS, assert_one_line_error, cli

from fixres.errors import FixresError, UsageError

#: The files of an export (``fixres.models.EXPORT``), spelled out so the tests read on their own.
EXPORT = ("model.safetensors", "fixres.json", "config.json", "USAGE.md", "README.md", "model.onnx")


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", per_class=4, seed=1)
    write_image_folder(data / "val", per_class=2, seed=2)
    return {"data": data, "ck": save_tiny_checkpoint(tmp_path / "tiny.safetensors"), "out": tmp_path / "out"}


def _model_args(setup, *extra):
    return ["--model", "fixres_tiny_resnet", "--checkpoint", setup["ck"], "--data", setup["data"], "--workers", "0",
            "-q", *extra]


# --------------------------------------------------------------------------- an export is never half replaced


def test_a_failed_export_leaves_the_previous_export_whole(tmp_path, tiny_model, monkeypatch):
    from fixres.models import export
    from fixres.models.loading import load_model
    out = tmp_path / "export"
    export.export_model(tiny_model.model, out, model_name="fixres_tiny_resnet", cfg=tiny_model.data_config,
                        test_size=32)
    before = _files(out)
    monkeypatch.setattr(export, "write_text", _no_space)  # the last file of an export: USAGE.md
    with pytest.raises(OSError, match="No space"):
        export.export_model(tiny_model.model, out, model_name="fixres_tiny_resnet", cfg=tiny_model.data_config,
                            test_size=48)
    assert _files(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    assert load_model(checkpoint=str(out / export.WEIGHTS_NAME)).test_size == 32


def test_a_failed_finetune_export_keeps_the_old_export_and_its_result_file(capsys, setup, monkeypatch):
    from fixres.models import export
    from fixres.models.loading import load_model
    out = setup["out"]
    code, _, err = cli(capsys, "finetune", *_model_args(setup, "--test-size", "32", "--epochs", "1", "--out", out))
    assert code == 0, err
    before = _files(out)
    assert {"finetune.json", export.WEIGHTS_NAME, export.META_NAME, export.USAGE_NAME} <= set(before)
    monkeypatch.setattr(export, "save_safetensors", _no_space)
    code, _, err = cli(capsys, "finetune", *_model_args(setup, "--test-size", "48", "--epochs", "1", "--out", out))
    assert code != 0
    assert_one_line_error(err)
    after = _files(out)
    for name in ("finetune.json", *EXPORT):  # every result file still describes the first run
        assert after.get(name) == before.get(name), name
    assert load_model(checkpoint=str(out / export.WEIGHTS_NAME)).test_size == 32


def test_a_failed_resume_of_a_finished_training_keeps_its_export(capsys, setup, monkeypatch):
    from fixres.models import export
    from fixres.models.loading import load_model
    out = setup["out"]
    argv = ["train", "--model", "fixres_tiny_resnet", "--data", setup["data"], "--train-size", "32", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "-q", "--out", out]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    before = {n: b for n, b in _files(out).items() if n in EXPORT}
    assert export.WEIGHTS_NAME in before and export.META_NAME in before
    monkeypatch.setattr(export, "save_safetensors", _no_space)
    code, _, err = cli(capsys, *argv, "--resume")
    assert code != 0, err
    assert {n: b for n, b in _files(out).items() if n in EXPORT} == before
    load_model(checkpoint=str(out / export.WEIGHTS_NAME))


# --------------------------------------------------------------------------- a command writes all its files or none


def test_a_failed_eval_leaves_the_previous_results_as_they_were(capsys, setup, monkeypatch):
    from fixres.io import atomic
    out = setup["out"]
    code, _, err = cli(capsys, "eval", *_model_args(setup, "--test-size", "32", "--out", out))
    assert code == 0, err
    before = _files(out)
    assert {"eval.json", "eval.csv"} <= set(before)
    real = atomic.write_json

    def refuse_eval_json(path, obj):
        if str(path).endswith("eval.json"):
            raise FixresError(f"refusing to write {path}: it holds NaN or infinity, which JSON cannot store")
        real(path, obj)
    monkeypatch.setattr(atomic, "write_json", refuse_eval_json)
    code, _, err = cli(capsys, "eval", *_model_args(setup, "--test-size", "48", "--out", out))
    assert code == 1
    assert _files(out) == before  # not a new eval.csv beside the old eval.json
    fresh = out.parent / "fresh"
    code, _, err = cli(capsys, "eval", *_model_args(setup, "--test-size", "48", "--out", fresh))
    assert code == 1
    assert not fresh.exists() or _files(fresh) == {}


def test_adapt_frechet_removes_the_model_another_method_left(capsys, setup):
    out = setup["out"]
    code, _, err = cli(capsys, "adapt", *_model_args(setup, "--method", "gaussian", "--test-size", "48",
                                                     "--out", out))
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    code, _, err = cli(capsys, "adapt", *_model_args(setup, "--method", "frechet", "--test-size", "48",
                                                     "--out", out))
    assert code == 0, err
    assert not [n for n in EXPORT if (out / n).exists()]
    assert json.loads((out / "adapt.json").read_text())["method"] == "frechet"


# --------------------------------------------------------------------------- --out: outside the data, writable

#: (command, flags that make a valid invocation apart from --data, --out and the model)
COMMANDS_WITH_DATA = {**MODEL_COMMANDS, "analyze": ["--plot"]}


@pytest.mark.parametrize("command", list(COMMANDS_WITH_DATA))
def test_an_out_inside_the_data_is_refused(capsys, setup, command):
    inside = setup["data"] / "val" / "class_0" / "sw"
    photos = sorted(setup["data"].rglob("*"))
    argv = ([command, "--data", setup["data"], "-q"] if command == "analyze"
            else [command, *_model_args(setup)])
    code, _, err = cli(capsys, *argv, *COMMANDS_WITH_DATA[command], "--out", inside)
    assert code == 2, err
    assert_one_line_error(err, "inside the data folder")
    assert sorted(setup["data"].rglob("*")) == photos


def test_an_out_below_a_file_is_a_usage_error(capsys, setup, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = cli(capsys, "eval", *_model_args(setup, "--test-size", "32", "--out", afile / "sub"))
    assert code == 2
    assert_one_line_error(err, "afile", "is a file")


def test_an_unwritable_out_is_a_usage_error(capsys, setup, tmp_path, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_open = os.open

    def no_write(path, flags, *args, **kwargs):  # a read-only folder (the tests run as root: chmod would not do)
        if str(path).startswith(str(read_only)):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", no_write)
    code, _, err = cli(capsys, "eval", *_model_args(setup, "--test-size", "32", "--out", read_only))
    assert code == 2
    assert_one_line_error(err, "cannot write", str(read_only), "--out")


# --------------------------------------------------------------------------- split-shaped roots, nested classes


def test_a_root_of_train_and_test_is_read_as_splits(capsys, tmp_path):
    from fixres.data.folders import resolve_split, scan_folder
    root = tmp_path / "d"
    write_image_folder(root / "train", per_class=3, seed=1)
    write_image_folder(root / "test", per_class=2, seed=2)
    assert resolve_split(root, "train") == root / "train"
    assert resolve_split(root, "val") == root / "test"
    assert "test/ folder is the evaluation split" in capsys.readouterr().err
    with pytest.raises(UsageError, match="holds no photos of its own"):
        scan_folder(root)  # read as classes, 'train' and 'test' would each merge three classes
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code, out, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", root,
                         "--workers", "0", "--test-size", "32", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n_images"] == 6 and result["num_classes"] == 3


def test_class_folders_holding_only_subfolders_are_refused(capsys, tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "a", per_class=2, seed=1)
    write_image_folder(root / "b", per_class=2, seed=2)
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code, _, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", root,
                       "--workers", "0", "--test-size", "32", "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "holds no photos of its own")


# --------------------------------------------------------------------------- one photo, one label


def test_a_file_link_to_another_class_is_an_error_naming_both(tmp_path):
    from fixres.data.folders import scan_folder
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    os.symlink(root / "class_0" / "img_000.jpg", root / "class_1" / "borrowed.jpg")
    with pytest.raises(UsageError, match="two classes") as info:
        scan_folder(root)
    assert "class_0/img_000.jpg" in str(info.value) and "class_1/borrowed.jpg" in str(info.value)


def test_a_photo_reached_twice_in_its_class_counts_once(tmp_path):
    from fixres.data.folders import scan_folder
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    os.symlink(root / "class_0" / "img_000.jpg", root / "class_0" / "again.jpg")
    os.link(root / "class_1" / "img_000.jpg", root / "class_1" / "hard.jpg")
    index = scan_folder(root, warn=False)
    names = sorted(os.path.relpath(p, root) for p, _ in index.samples)
    assert names[:2] == ["class_0/img_000.jpg", "class_0/img_001.jpg"]  # the plain file, not the link
    assert len(names) == 4 and names[3] == "class_1/img_001.jpg"  # of two hard links, one


# --------------------------------------------------------------------------- the data fingerprint reads content


def test_a_photo_rewritten_with_the_same_size_and_time_changes_the_fingerprint(tmp_path):
    from fixres.job.fingerprint import index_fingerprint
    root = write_image_folder(tmp_path / "d", classes=1, per_class=2)
    photo = root / "class_0" / "img_000.jpg"
    samples = [(str(p), 0) for p in sorted((root / "class_0").iterdir())]
    before = index_fingerprint(samples)
    st = photo.stat()
    data = bytearray(photo.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle: same size
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (photo.stat().st_size, photo.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert index_fingerprint(samples) != before


def test_the_content_sample_of_a_large_file_reads_both_ends(tmp_path):
    from fixres.job.fingerprint import SAMPLE_BLOCK, content_sample
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(5 * SAMPLE_BLOCK))
    first = content_sample(big)
    big.write_bytes(bytes(5 * SAMPLE_BLOCK - 1) + b"\x01")
    assert content_sample(big) != first
    big.write_bytes(b"\x01" + bytes(5 * SAMPLE_BLOCK - 1))
    assert content_sample(big) != first


# --------------------------------------------------------------------------- the output lock dies with its process

HOLDER = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    from fixres.io.lock import locked_folder

    def worker():  # a DataLoader worker, forked while the lock is held
        time.sleep(60)

    with locked_folder(sys.argv[1]):
        child = multiprocessing.get_context("fork").Process(target=worker)
        child.start()
        with open(sys.argv[2], "w") as f:
            f.write(str(child.pid))
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_the_lock_does_not_outlive_its_process_in_forked_workers(tmp_path):
    from fixres.io.lock import locked_folder
    folder, pid_file = tmp_path / "out", tmp_path / "worker.pid"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    # no pipes: the orphan worker would hold them open, and the wait would last as long as it does
    res = subprocess.run([sys.executable, str(script), str(folder), str(pid_file)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, timeout=60)
    assert res.returncode == -signal.SIGKILL
    worker = int(pid_file.read_text())
    try:
        os.kill(worker, 0)  # the orphan worker is still alive ...
        with locked_folder(folder):  # ... and the folder is free at once
            pass
    finally:
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.05)


def test_the_export_files_are_the_ones_the_tests_name():
    from fixres.models.export import EXPORT_FILES
    assert set(EXPORT_FILES) == set(EXPORT)
