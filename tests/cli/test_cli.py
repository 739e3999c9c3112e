"""The command line: fast help, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import MODEL_COMMANDS, assert_one_line_error, cli, fixres_subprocess

from fixres.cli.app import COMMANDS, _oom_message
from fixres.errors import FixresError, UsageError

# --------------------------------------------------------------------------- help is fast: no torch


def test_help_does_not_import_torch():
    code = "import sys; from fixres.cli.app import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_subcommand_help_does_not_import_torch():
    code = ("import sys, io, contextlib\n"
            "from fixres.cli.app import main, COMMANDS\n"
            "codes = []\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    codes = [main([c, '--help']) for c in COMMANDS]\n"
            "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{[0] * len(COMMANDS)} False"


def test_every_flag_has_help_and_advertised_batch_defaults_are_the_library_ones():
    import re

    from fixres import config
    from fixres.cli import eval as eval_cmd
    from fixres.cli.app import build_parser
    library = {"eval": config.DEFAULT_BATCH_SIZE, "sweep": config.DEFAULT_BATCH_SIZE,
               "finetune": config.DEFAULT_BATCH_SIZE, "fix": config.DEFAULT_BATCH_SIZE,
               "stats": config.DEFAULT_STATS_BATCH_SIZE, "adapt": config.DEFAULT_STATS_BATCH_SIZE,
               "train": config.DEFAULT_TRAIN_BATCH_SIZE}
    assert config.DEFAULT_BATCH_SIZE // eval_cmd.TEN_CROP_BATCH_DIVISOR == 8
    sub = next(a for a in build_parser()._actions if a.choices and "eval" in a.choices)
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"fixres {name} {action.option_strings[0]} has no help text"
            if "--batch-size" in action.option_strings:
                advertised = int(re.search(r"default (\d+)", action.help).group(1))
                assert advertised == library[name], name


def test_fixres_help_and_version_subprocess():
    res = fixres_subprocess("--help", timeout=60)
    assert res.returncode == 0
    for name in COMMANDS:
        assert name in res.stdout
    res = fixres_subprocess("--version", timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("fixres ")


def test_analyze_json_subprocess():
    res = fixres_subprocess("analyze", "--train-size", "224", "--json", "--samples", "5000", timeout=60)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["recommended_test_size"] == 288 and round(data["ratio"], 2) == 0.81


def test_usage_error_subprocess_exit_2_one_line():
    res = fixres_subprocess("analyze", "--train-size", "0", timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert_one_line_error(res.stderr, "--train-size", "> 0")


# --------------------------------------------------------------------------- usage errors in-process


@pytest.mark.parametrize("argv,phrase", [
    (["analyze", "--train-size", "0"], "--train-size"),
    (["analyze", "--train-size", "-224"], "--train-size"),
    (["analyze", "--train-size", "abc"], "whole number"),
    (["analyze", "--train-size", "224.5"], "whole number"),
    (["analyze", "--crop-ratio", "0"], "(0, 1]"),
    (["analyze", "--crop-ratio", "1.2"], "(0, 1]"),
    (["analyze", "--crop-ratio", "-0.5"], "(0, 1]"),
    (["analyze", "--crop-ratio", "nan"], "(0, 1]"),
    (["analyze", "--crop-ratio", "x"], "(0, 1]"),
    (["analyze", "--stride", "0"], "--stride"),
    (["analyze", "--test-size", "0"], "--test-size"),
    (["analyze", "--samples", "0"], "--samples"),
    (["analyze", "--image-sizes", "500x0"], "500x0"),
    (["analyze", "--image-sizes", "big"], "big"),
    (["analyze", "--data", "/no/such/folder"], "not found"),
    (["analyze", "--no-such-flag"], "unrecognized"),
    (["no-such-command"], "invalid choice"),
])
def test_usage_errors_exit_2(capsys, argv, phrase):
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, phrase)


def test_data_path_is_a_file(capsys, tmp_path):
    f = tmp_path / "photo.jpg"
    f.write_bytes(b"x")
    code, _, err = cli(capsys, "analyze", "--data", f)
    assert code == 2
    assert_one_line_error(err, "not a folder")


def test_no_arguments_runs_the_main_job(capsys, monkeypatch):
    """`fixres` alone runs `fixres fix` (the whole method on the embedded data set)."""
    from fixres.cli import fix
    monkeypatch.setattr(fix, "run", lambda args: ({"command": "fix"}, "fix ran"))
    code, out, err = cli(capsys)
    assert code == 0 and out.strip() == "fix ran"


def test_verbose_shows_traceback(capsys):
    code, _, err = cli(capsys, "analyze", "--data", "/no/such/folder", "-v")
    assert code == 2
    assert "Traceback" in err and "not found" in err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- runtime failures


def _raise(exc):
    def run(args):
        raise exc
    return run


def test_unexpected_error_is_one_line_exit_1(capsys, monkeypatch):
    from fixres.cli import analyze
    monkeypatch.setattr(analyze, "run", _raise(ValueError("something odd\nsecond line")))
    code, _, err = cli(capsys, "analyze")
    assert code == 1
    assert_one_line_error(err, "ValueError", "something odd", "-v")
    code, _, err = cli(capsys, "analyze", "-v")
    assert code == 1 and "Traceback" in err


def test_fixres_error_exit_1_and_usage_error_exit_2(capsys, monkeypatch):
    from fixres.cli import analyze
    monkeypatch.setattr(analyze, "run", _raise(FixresError("the run failed")))
    code, _, err = cli(capsys, "analyze")
    assert code == 1
    assert_one_line_error(err, "the run failed")
    monkeypatch.setattr(analyze, "run", _raise(UsageError("bad flag combination")))
    code, _, err = cli(capsys, "analyze")
    assert code == 2
    assert_one_line_error(err, "bad flag combination")


def test_multi_line_library_message_prints_as_one_line(capsys, monkeypatch):
    from fixres.cli import analyze
    monkeypatch.setattr(analyze, "run", _raise(FixresError("first part\n  second part")))
    code, _, err = cli(capsys, "analyze")
    assert code == 1
    assert_one_line_error(err, "first part second part")


@pytest.mark.parametrize("exc", [
    MemoryError(),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 1000000 bytes"),
])
def test_out_of_memory_suggests_batch_size(capsys, monkeypatch, exc):
    assert "--batch-size" in _oom_message(exc)
    from fixres.cli import analyze
    monkeypatch.setattr(analyze, "run", _raise(exc))
    code, _, err = cli(capsys, "analyze")
    assert code == 1
    assert_one_line_error(err, "out of memory", "--batch-size")


def test_wrapped_oom_still_suggests_batch_size(capsys, monkeypatch):
    from fixres.cli import analyze
    monkeypatch.setattr(analyze, "run", _raise(FixresError("cannot trace Net at 64px: CUDA out of memory")))
    code, _, err = cli(capsys, "analyze")
    assert code == 1
    assert_one_line_error(err, "cannot trace", "--batch-size")


def test_oom_message_only_for_memory_errors():
    assert _oom_message(RuntimeError("shape mismatch")) is None
    assert _oom_message(ValueError("bad")) is None


def test_cuda_oom_error_class():
    import torch
    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    assert "--batch-size" in _oom_message(exc)


def test_keyboard_interrupt_exit_130(capsys, monkeypatch):
    from fixres.cli import analyze
    monkeypatch.setattr(analyze, "run", _raise(KeyboardInterrupt()))
    code, _, err = cli(capsys, "analyze")
    assert code == 130 and "interrupted" in err


# --------------------------------------------------------------------------- library-level argument checks


def test_cuda_where_none_exists_is_a_usage_error():
    import torch

    from fixres.runtime.dist import resolve_device
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_device("auto").type == "cpu"


def test_unknown_model_name_suggests():
    from fixres.models.loading import load_model
    with pytest.raises(UsageError, match="unknown model 'resnet5O'.*did you mean"):
        load_model(model="resnet5O")
    with pytest.raises(UsageError, match="no model given"):
        load_model()


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    from fixres.models.loading import load_model
    with pytest.raises(UsageError, match="checkpoint not found"):
        load_model(model="fixres_tiny_resnet", checkpoint=str(tmp_path / "nope.safetensors"))


def test_warn_stride():
    from fixres.cli.args import warn_stride
    assert warn_stride(256, 32, quiet=True) is False
    assert warn_stride(250, 32, quiet=True) is True
    assert warn_stride(250, 1, quiet=True) is False


# --------------------------------------------------------------------------- other commands (written in parallel)




@pytest.fixture
def tiny_setup(tmp_path, image_folder):
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    return {"data": image_folder, "ck": ck, "out": tmp_path / "out"}


def _base(command, setup):
    return [command, "--model", "fixres_tiny_resnet", "--checkpoint", setup["ck"], "--data", setup["data"],
            "--workers", "0", "--out", setup["out"], "-q", *MODEL_COMMANDS[command]]


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
@pytest.mark.parametrize("bad,phrase", [
    (["--device", "cuda"], "cuda"),
    (["--model", "no_such_model_xyz"], "no_such_model_xyz"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--checkpoint", "/no/such/weights.safetensors"], "/no/such/weights.safetensors"),
    (["--crop-ratio", "1.5"], "(0, 1]"),
    (["--batch-size", "0"], "--batch-size"),
    (["--std", "0,0.2,0.2"], "std"),
    (["--class-map", "/no/such/classes.json"], "class map not found"),
])
def test_command_usage_errors(capsys, tiny_setup, command, bad, phrase):
    if bad[0] == "--device":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
    code, out, err = cli(capsys, *_base(command, tiny_setup), *bad)
    assert code == 2, err
    assert_one_line_error(err, phrase)


@pytest.mark.parametrize("command,flag", [("eval", "--test-size"), ("sweep", "--test-sizes"),
                                          ("finetune", "--test-size"), ("train", "--train-size")])
def test_command_nonpositive_size(capsys, tiny_setup, command, flag):
    argv = _base(command, tiny_setup)
    i = argv.index(flag)
    argv[i + 1] = "0"
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, flag)


@pytest.mark.parametrize("command,flag,value", [("eval", "--test-size", "40"), ("sweep", "--test-sizes", "32,40"),
                                                ("finetune", "--test-size", "40")])
def test_stride_warning(capsys, tiny_setup, command, flag, value):
    """A size that is not a multiple of the stride (32) warns in one line and still runs (appendix B)."""
    argv = _base(command, tiny_setup)
    argv[argv.index(flag) + 1] = value
    argv.remove("-q")  # -q silences the warning too
    if command == "finetune":  # it fits on train/ and reports val/
        split = tiny_setup["out"].parent / "split"
        write_image_folder(split / "train", per_class=4, seed=1)
        write_image_folder(split / "val", per_class=2, seed=2)
        argv[argv.index("--data") + 1] = split
        argv += ["--no-export"]
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("fixres: warning") and "stride" in ln]
    assert len(warnings) == 1 and "40" in warnings[0]
    result = json.loads(out)
    assert 40 in {r["test_size"] for r in result["rows"]} if "rows" in result else result["test_size"] == 40


@pytest.mark.parametrize("argv,phrase", [
    (["sweep", "--test-sizes", "0,32"], "--test-sizes"),
    (["sweep", "--test-sizes", "abc"], "--test-sizes"),
    (["sweep", "--crop-ratios", "0.5,1.5"], "(0, 1]"),
    (["report", "/no/such/run/dir"], "/no/such/run/dir"),
    (["make-dataset", "--classes", "0"], "--classes"),
    (["adapt", "--method", "magic"], "--method"),
    (["eval", "--test-size", "32"], "--data"),  # a required flag left out
    (["eval", "--data", ".", "--mean", "0.5,0.5"], "three numbers"),
    (["eval", "--data", ".", "--std", "a,b,c"], "three numbers"),
])
def test_more_usage_errors(capsys, tmp_path, argv, phrase):
    code, out, err = cli(capsys, *argv, *(["--data", tmp_path] if argv[0] == "sweep" else []))
    assert code == 2, err
    assert_one_line_error(err, phrase)
