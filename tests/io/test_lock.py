"""One writer per output folder: two runs sharing an --out never both write."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fixres.io.lock import LOCK_NAME, FolderBusy, locked_folder, sibling_lock

HOLDER = r"""
import sys
from fixres.io.lock import locked_folder
with locked_folder(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def test_a_second_lock_on_the_same_folder_is_refused_naming_it(tmp_path):
    out = tmp_path / "out"
    with locked_folder(out):
        assert (out / LOCK_NAME).is_file()
        with pytest.raises(FolderBusy) as err:
            with locked_folder(out):
                pytest.fail("two holders of one folder")
        assert str(out) in str(err.value) and "\n" not in str(err.value)
        (out / "result.json").write_text("{}")
    assert not (out / LOCK_NAME).exists()  # released and removed
    with locked_folder(out):  # free again
        pass
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]


def test_a_folder_created_for_a_run_that_wrote_nothing_is_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with locked_folder(tmp_path / "new"):
            raise RuntimeError("the command failed before writing")
    assert not (tmp_path / "new").exists()


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/out."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_a_second_process_gets_a_one_line_error_and_writes_nothing(holder, tmp_path, capsys):
    from fixres.cli.app import main
    before = sorted(p.name for p in holder.iterdir())
    code = main(["eval", "--model", "fixres_tiny_resnet", "--random-init", "--data", str(tmp_path / "no-data"),
                 "--out", str(holder)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert err.startswith("fixres eval: error:") and f"{holder} is in use by another fixres run" in err
    assert sorted(p.name for p in holder.iterdir()) == before


def test_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait(timeout=60)
    assert (out / LOCK_NAME).exists()  # left behind by the kill, but no longer held
    with locked_folder(out):
        pass


def test_only_rank_zero_of_a_torchrun_job_takes_the_lock(holder, tmp_path, monkeypatch):
    """The ranks of one job share their folder: rank 1 does not lock (rank 0 did, or failed first)."""
    from fixres.cli.app import _output_lock, build_parser
    args = build_parser().parse_args(["eval", "--model", "m", "--data", str(tmp_path / "data"), "--out", str(holder)])
    monkeypatch.setenv("RANK", "1")
    with _output_lock(args):
        pass
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(FolderBusy):
        with _output_lock(args):
            pass


def test_every_command_writing_to_out_takes_the_lock(holder, tmp_path):
    from fixres.cli.app import COMMANDS, _output_lock, build_parser
    needs = {"fix": [], "analyze": ["--train-size", "64", "--plot"], "eval": ["--model", "m", "--data", "d"],
             "sweep": ["--model", "m", "--data", "d"], "finetune": ["--model", "m", "--data", "d"],
             "adapt": ["--model", "m", "--data", "d", "--method", "bn-recalibrate"],
             "stats": ["--model", "m", "--data", "d"],
             "train": ["--model", "m", "--data", "d", "--train-size", "32"], "make-dataset": []}
    assert set(needs) == set(COMMANDS) - {"report"}  # report writes below its RUN_DIR, not to --out
    for command, extra in needs.items():
        args = build_parser().parse_args([command, *extra, "--out", str(holder)])
        if command == "make-dataset":  # a data set folder is swapped as a whole: its lock sits beside it
            with _output_lock(args):
                assert sibling_lock(holder).exists()
            assert not sibling_lock(holder).exists()
            continue
        with pytest.raises(FolderBusy, match="in use"):
            with _output_lock(args):
                pytest.fail(f"{command} would write into a folder another run holds")
