"""Numeric and path flags: non-finite numbers, absurd sizes and ranges,
and an --out that is a file are usage errors (exit 2, one line), never a NaN model or a crash."""

from __future__ import annotations

import argparse

import pytest
from helpers.cli import assert_one_line_error, cli

from fixres.cli import args as _args


@pytest.mark.parametrize("argv,phrase", [
    (["train", "--lr", "inf"], "finite"),
    (["train", "--lr", "nan"], "finite"),
    (["train", "--weight-decay", "inf"], "finite"),
    (["train", "--warmup-epochs", "inf"], "finite"),
    (["train", "--label-smoothing", "nan"], "finite"),
    (["finetune", "--lr", "inf"], "finite"),
    (["finetune", "--cache-budget-mb", "inf"], "finite"),
    (["eval", "--mean", "nan,0,0"], "finite"),
    (["eval", "--mean", "0,-inf,0"], "finite"),
    (["eval", "--std", "inf,1,1"], "finite"),
    (["eval", "--std", "0,1,1"], "at least 0.001"),
    (["eval", "--crop-ratio", "inf"], "finite"),
    (["analyze", "--crop-ratio", "1e-9"], "below"),
    (["sweep", "--crop-ratios", "0.875,1e-9"], "below"),
    (["sweep", "--test-sizes", "10:5:1"], "empty"),
    (["sweep", "--test-sizes", "1:100000:1"], f"at most {_args.MAX_SIZES}"),
    (["sweep", "--test-sizes", "128,100000"], f"largest supported size {_args.MAX_IMAGE_SIZE}"),
    (["sweep", "--test-sizes", "128:256:0"], "step"),
])
def test_bad_numbers_exit_2_one_line(capsys, tmp_path, argv, phrase):
    code, out, err = cli(capsys, *argv, "--data", tmp_path)
    assert code == 2, err
    assert out == ""
    assert_one_line_error(err, argv[-2], phrase)


def test_size_ranges_and_caps():
    assert _args.int_list("128:256:64") == [128, 192, 256]
    assert _args.int_list("224") == [224]
    assert len(_args.int_list(f"1:{_args.MAX_SIZES}:1")) == _args.MAX_SIZES
    assert _args.int_list(f"{_args.MAX_IMAGE_SIZE}") == [_args.MAX_IMAGE_SIZE]
    with pytest.raises(argparse.ArgumentTypeError, match="empty: stop 5 is below start 10"):
        _args.int_list("10:5:1")
    with pytest.raises(argparse.ArgumentTypeError, match="sizes must be positive"):
        _args.int_list("-8:8:8")
    assert _args.crop_ratio(str(_args.MIN_CROP_RATIO)) == _args.MIN_CROP_RATIO
    assert _args.rgb_std("0.2,0.3,0.4") == [0.2, 0.3, 0.4]


@pytest.mark.parametrize("command", ["eval", "analyze", "make-dataset"])
def test_out_at_an_existing_file_exit_2(capsys, tmp_path, command):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, out, err = cli(capsys, command, "--out", target, *(["--data", tmp_path] if command == "eval" else []))
    assert code == 2, err
    assert_one_line_error(err, "--out", "is a file")
    assert target.read_text() == "keep me"
