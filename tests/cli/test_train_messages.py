"""What `fixres train` tells a user along the way: what an epoch is when repeated augmentation
and full batches change it, no empty validation columns, `fixres fix` as the next step, and the model card."""

from __future__ import annotations

from helpers import write_image_folder
from helpers.cli import cli


def _train(capsys, tmp_path, *extra):
    data = write_image_folder(tmp_path / "d", classes=3, per_class=3)
    return cli(capsys, "train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", "32", "--epochs", "1",
               "--batch-size", "4", "--workers", "0", "--out", tmp_path / "o", *extra)


def test_epoch_is_explained_with_repeated_augmentation_and_the_dropped_remainder(capsys, tmp_path):
    code, out, err = _train(capsys, tmp_path, "--repeats", "3")
    assert code == 0, err
    # 2 x 9 photos = 18 samples (the paper's epoch length with repeats), 4 full batches of 4 = 16 used.
    assert ("an epoch is 16 samples: 2 x 9 training photos; each drawn photo in 3 augmented copies "
            "(repeated augmentation), so about 6 distinct photos; 2 left over after the last full batch of 4 "
            "are not used") in err
    assert "next: fixres fix --checkpoint" in out and "--train-size 32" in out


def test_the_model_card_says_the_command_and_the_photos(capsys, tmp_path):
    code, _, err = _train(capsys, tmp_path, "--repeats", "1")
    assert code == 0, err
    card = (tmp_path / "o" / "README.md").read_text()
    assert "fixres train --model fixres_tiny_resnet" in card and str(tmp_path / "d") in card


def test_without_repeats_the_epoch_is_the_photos_and_the_remainder(capsys, tmp_path):
    code, out, err = _train(capsys, tmp_path, "--repeats", "1")
    assert code == 0, err
    assert "an epoch is 8 samples: 1 x 9 training photos; 1 left over after the last full batch of 4" in err
    assert "repeated augmentation" not in err


def test_epoch_line_without_validation_has_no_empty_columns():
    # `fixres fix` trains with no validation images (its sweep measures every size right after).
    from fixres.method.trainlog import epoch_line
    record = {"epoch": 3, "train_loss": 1.25, "train_top1": 40.0, "images_per_s": 50.0, "forward_ms": 2.0,
              "backward_ms": 3.0, "val_top1_train_size": None, "val_top1_test_size": None}
    line = epoch_line(record, 64, 80)
    assert line == "epoch 3: loss 1.250, train top-1 40.0%, 50.0 img/s, fwd 2.0 ms + bwd 3.0 ms per batch"
    record.update(val_top1_train_size=50.0, val_top1_test_size=55.5)
    assert "val top-1 50.0% @64px, 55.5% @80px, " in epoch_line(record, 64, 80)
