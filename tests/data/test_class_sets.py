"""Class sets and folder trees: one rule for mapping val onto training classes,
links that would count a photo twice are skipped and named, unreadable folders are called unreadable."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import assert_one_line_error, cli
from helpers.corpus import write_folder_traps

from fixres.data.folders import index_val_onto, missing_classes_warning, scan_folder
from fixres.errors import UsageError


def _split(root: Path, *, val_classes: list[int]) -> Path:
    """train/ with classes class_0..class_2, val/ with only ``val_classes`` (same names)."""
    write_image_folder(root / "train", classes=3, per_class=3, seed=1)
    full = write_image_folder(root / "val_all", classes=3, per_class=2, seed=2)
    (root / "val").mkdir()
    for c in val_classes:
        shutil.move(str(full / f"class_{c}"), root / "val" / f"class_{c}")
    shutil.rmtree(full)
    return root


def test_val_is_mapped_onto_training_classes_by_name(tmp_path):
    """The 12.1 example: a class missing from val must not shift the next class onto its index."""
    root = _split(tmp_path / "d", val_classes=[0, 2])
    train = scan_folder(root / "train")
    val = index_val_onto(root / "val", train)
    assert val.classes == train.classes == ["class_0", "class_1", "class_2"]
    labels = {Path(p).parent.name: y for p, y in val.samples}
    assert labels == {"class_0": 0, "class_2": 2}  # sorted val folders alone would give class_2 -> 1
    assert val.missing_classes == ["class_1"]
    msg = missing_classes_warning(val)
    assert "class_1" in msg and "1 training class" in msg
    # a plain list of names (a class map, an export's class names) gives the same labels
    assert index_val_onto(root / "val", train.classes).samples == val.samples
    assert missing_classes_warning(index_val_onto(root / "train", train)) is None


def test_unknown_val_class_is_an_error_naming_it(tmp_path):
    root = _split(tmp_path / "d", val_classes=[0, 1, 2])
    write_image_folder(root / "extra", classes=1, per_class=1, seed=9)
    shutil.move(str(root / "extra" / "class_0"), root / "val" / "zebra")
    train = scan_folder(root / "train")
    with pytest.raises(UsageError, match="val class 'zebra'.*not one of the 3 training"):
        index_val_onto(root / "val", train)


def test_missing_is_judged_against_classes_with_training_images(tmp_path):
    """A class-map slot without training images (an ImageNet subset) is not reported as missing from val."""
    root = _split(tmp_path / "d", val_classes=[0])
    train = scan_folder(root / "train", class_map=["class_0", "class_1", "class_2", "class_never"])
    val = index_val_onto(root / "val", train)
    assert val.missing_classes == ["class_1", "class_2"]
    assert index_val_onto(root / "val", ["class_0", "<unused 1>"]).missing_classes == []


def test_finetune_warns_about_a_class_missing_from_val(capsys, tmp_path):
    root = _split(tmp_path / "d", val_classes=[0, 2])
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors")
    code, out, err = cli(capsys, "finetune", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", root,
                         "--test-size", "32", "--epochs", "1", "--no-export", "--workers", "0",
                         "--batch-size", "4", "--out", tmp_path / "out")
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if "warning" in ln and "class_1" in ln]
    assert len(warning) == 1, err


def test_eval_class_map_refuses_an_unknown_val_class(capsys, tmp_path):
    root = _split(tmp_path / "d", val_classes=[0, 1, 2])
    shutil.move(str(root / "val" / "class_2"), root / "val" / "zebra")
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors")
    cmap = tmp_path / "classes.txt"
    cmap.write_text("class_0\nclass_1\nclass_2\n")
    code, out, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", root,
                         "--class-map", cmap, "--test-size", "32", "--workers", "0", "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "zebra")


# --------------------------------------------------------------------------- folder loops


def test_folder_traps_are_skipped_and_named(tmp_path, capsys):
    traps = write_folder_traps(tmp_path / "d")
    index = scan_folder(traps.root)
    assert index.classes == sorted(traps.samples)
    got: dict[str, list[str]] = {}
    for path, label in index.samples:
        got.setdefault(index.classes[label], []).append(os.path.relpath(path, traps.root))
    assert {c: sorted(v) for c, v in got.items()} == traps.samples  # each photo once, under its own class
    skipped = {os.path.relpath(p, traps.root): reason for p, reason in index.skipped_folders}
    assert set(skipped) == set(traps.skipped), skipped
    for name, phrase in traps.skipped.items():
        assert phrase in skipped[name], (name, skipped[name])
    err = capsys.readouterr().err
    assert all(f"skipped {traps.root / name}" in err for name in traps.skipped), err


def test_val_link_to_parent_does_not_count_photos_again(tmp_path):
    """``val/c -> ..`` : without the rule the train photos would be scored as class c."""
    root = _split(tmp_path / "d", val_classes=[0, 1])
    os.symlink("..", root / "val" / "class_2")
    train = scan_folder(root / "train")
    val = index_val_onto(root / "val", train)
    assert len(val) == 4 and {y for _, y in val.samples} == {0, 1}
    assert val.missing_classes == ["class_2"]
    assert [os.path.basename(p) for p, _ in val.skipped_folders] == ["class_2"]


def test_cli_symlink_loop_class_is_skipped_not_a_crash(capsys, tmp_path):
    traps = write_folder_traps(tmp_path / "d")
    code, out, err = cli(capsys, "analyze", "--data", traps.root, "--json")
    assert code == 0, err
    assert "Traceback" not in err and "skipped" in err and "loop" in err


# --------------------------------------------------------------------------- unreadable folders, .jfif


def test_unreadable_class_folder_is_called_unreadable(tmp_path, monkeypatch):
    """chmod 000 does not stop root (the tests run as root), so the denial is simulated where it happens."""
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    locked = str(root / "class_1")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UsageError, match="cannot read folder .*class_1.*unreadable: Permission denied") as exc:
        scan_folder(root)
    assert "empty" not in str(exc.value)


def test_jfif_photos_are_read(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    shutil.copy(root / "class_0" / "img_000.jpg", root / "class_0" / "browser_save.jfif")
    names = sorted(os.path.basename(p) for p, y in scan_folder(root).samples if y == 0)
    assert names == ["browser_save.jfif", "img_000.jpg", "img_001.jpg"]
