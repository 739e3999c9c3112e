"""A training run's rows and state read back as types: ``train.EpochRecord`` (a row of log.jsonl) and
``loop.SavedFields`` (the fields of a state file every loop shares)."""

from __future__ import annotations

import pytest
import torch

from fixres.errors import UsageError
from fixres.io import schema
from fixres.io.checkpoint import save_training_state
from fixres.method import loop
from fixres.method.train import STATE_LAYOUT, EpochRecord
from fixres.method.trainlog import epoch_line

TRAINED = {"epoch": 2, "step": 12, "lr": 0.05, "train_loss": 1.5, "train_top1": 40.0, "images": 48, "seconds": 2.0,
           "images_per_s": 24.0, "forward_ms": 3.0, "forward_ms_std": 0.5, "backward_ms": 4.0, "backward_ms_std": 0.5,
           "optimizer_ms": 1.0, "optimizer_ms_std": 0.1, "local_batch": 8}
VALIDATED = {**TRAINED, "val_top1": {"32": 50.0, "48": 55.5}, "val_top1_train_size": 50.0,
             "val_top1_test_size": 55.5, "val_n": 6}


@pytest.mark.parametrize("row", [TRAINED, VALIDATED])
def test_a_row_reads_back_as_it_was_written(row):
    record = schema.parse(EpochRecord, row)
    assert record.to_dict() == row and list(record.to_dict()) == list(row)  # same keys, same order


def test_an_epoch_without_validation_has_no_val_keys():
    record = EpochRecord(epoch=1, train_loss=2.0, train_top1=10.0)
    assert not [k for k in record.to_dict() if k.startswith("val_")]
    record.val_top1, record.val_top1_train_size, record.val_top1_test_size, record.val_n = {"32": 1.0}, None, None, 3
    assert {"val_top1", "val_top1_train_size", "val_top1_test_size", "val_n"} <= set(record.to_dict())


def test_the_epoch_line_reads_a_record_as_it_reads_a_row():
    assert epoch_line(schema.parse(EpochRecord, VALIDATED), 32, 48) == epoch_line(dict(VALIDATED), 32, 48)
    assert "val top-1 50.0% @32px, 55.5% @48px, " in epoch_line(dict(VALIDATED), 32, 48)


def test_a_saved_state_reads_back_with_its_parts(tmp_path):
    weights = {"w": torch.ones(2)}
    state = loop.LoopState(epoch=3, weights=weights, settings={"lr": 0.1}, log=[VALIDATED],
                           optimizer={"state": {}, "param_groups": []}, scaler={})
    state.save(tmp_path / "s.pt", STATE_LAYOUT)
    back = loop.LoopState.load(tmp_path / "s.pt", STATE_LAYOUT)
    assert back.epoch == 3 and back.settings == {"lr": 0.1} and back.log == [VALIDATED]
    assert torch.equal(back.weights["w"], weights["w"])
    assert back.optimizer == {"state": {}, "param_groups": []} and back.scaler == {} and back.scheduler is None


def test_a_state_without_its_epoch_is_refused_in_one_line(tmp_path):
    save_training_state({"version": loop.STATE_VERSION, "model": {}, "hparams": {}, "log": None}, tmp_path / "s.pt")
    with pytest.raises(UsageError, match="cannot resume from .*s.pt: not a training state"):
        loop.LoopState.load(tmp_path / "s.pt", STATE_LAYOUT)
