"""Kills mid-run: SIGKILL a fine-tune and a training run mid-epoch, resume, and end with
exactly the weights of an uninterrupted run; nothing half-written is ever left under a final name.

The killed and the resumed runs are real ``fixres`` subprocesses on a tiny generated data set (CPU, one
thread, fixed seed); the uninterrupted reference runs in this process, also on one thread, while the
resumed process starts up (to keep the wall time down on a shared machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import FIXRES

from fixres.io.atomic import append_jsonl, atomic_path, read_jsonl, write_json, write_text
from fixres.io.checkpoint import load_state_dict, load_training_state, save_safetensors
from fixres.io.lock import LOCK_NAME

#: Longest a tiny run may take on a loaded 2-core machine before the test gives up.
RUN_TIMEOUT_S = 240
POLL_S = 0.02
#: Epochs of the killed runs: enough left after the first checkpoint that the kill lands mid-run even on
#: a loaded machine (each epoch is a fraction of a second here).
EPOCHS = 6
#: The run environment: one thread makes CPU kernels bitwise reproducible and shares the machine fairly.
RUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# --------------------------------------------------------------------------- atomic writes (unit)


def test_atomic_path_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "result.json"
    target.write_text('{"old": true}')
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"new": tr')  # half-written ...
            raise RuntimeError("killed while writing")
    assert target.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temp file left


def test_atomic_path_new_file_on_error(tmp_path):
    target = tmp_path / "sub" / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_atomic_writes_replace_whole(tmp_path):
    p = tmp_path / "r.json"
    write_json(p, {"a": 1})
    write_json(p, {"b": [1, 2]})
    assert json.loads(p.read_text()) == {"b": [1, 2]}
    write_text(tmp_path / "t.txt", "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json", "t.txt"]


def test_read_jsonl_tolerates_a_torn_last_line(tmp_path):
    p = tmp_path / "log.jsonl"
    append_jsonl(p, {"epoch": 1})
    append_jsonl(p, {"epoch": 2})
    with open(p, "a") as f:
        f.write('{"epoch": 3, "lo')  # killed mid-append
    assert read_jsonl(p) == [{"epoch": 1}, {"epoch": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


KILL_WRITER = r"""
import os, signal, sys
from fixres.io.atomic import atomic_path
target, kind = sys.argv[1], sys.argv[2]
if kind == "json":
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write('{"new": "half')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
else:
    import torch
    import safetensors.torch as st
    from fixres.io.checkpoint import save_safetensors
    real = st.save_file
    def save_then_die(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)  # as if the kill came mid-write
        os.kill(os.getpid(), signal.SIGKILL)
    st.save_file = save_then_die
    save_safetensors({"w": torch.ones(1000)}, target)
"""


@pytest.mark.parametrize("kind", ["json", "safetensors"])
def test_sigkill_during_atomic_write_leaves_old_file(tmp_path, kind):
    """A process SIGKILLed inside an atomic write leaves the previous complete file under the final name."""
    target = tmp_path / ("result.json" if kind == "json" else "model.safetensors")
    if kind == "json":
        write_json(target, {"old": True})
    else:
        save_safetensors({"w": torch.zeros(1000)}, target)
    res = subprocess.run([sys.executable, "-c", KILL_WRITER, str(target), kind], capture_output=True, timeout=120,
                         env=RUN_ENV)
    assert res.returncode == -signal.SIGKILL
    if kind == "json":
        assert json.loads(target.read_text()) == {"old": True}
    else:
        assert torch.equal(load_state_dict(target)["w"], torch.zeros(1000))
    # Only a hidden temp file (never a final name) may be left by the kill.
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(n.startswith(f".{target.name}.") and n.endswith(".tmp") for n in leftovers)


# --------------------------------------------------------------------------- kill a real run


def _launch(argv: list, log_path: Path) -> subprocess.Popen:
    """Start ``fixres ARGV``: stderr to ``log_path``, stdout (the --json result) beside it."""
    with open(log_path, "w") as err, open(log_path.with_suffix(".out"), "w") as out:
        return subprocess.Popen([str(FIXRES), *map(str, argv)], stdout=out, stderr=err, env=RUN_ENV)


def _wait(proc: subprocess.Popen, log_path: Path) -> dict | None:
    """Wait for success; returns the --json result when the run printed one."""
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"run timed out; log:\n{log_path.read_text()[-3000:]}")
    assert code == 0, f"run failed with {code}; log:\n{log_path.read_text()[-3000:]}"
    out = log_path.with_suffix(".out").read_text()
    return json.loads(out) if out.strip().startswith("{") else None


def _kill_mid_epoch(proc: subprocess.Popen, state_path: Path, log_jsonl: Path, log_path: Path) -> int:
    """Wait for the first epoch's checkpoint, then SIGKILL about half-way through the next epoch."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not state_path.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before its first checkpoint ({proc.returncode}); log:\n"
                        f"{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared")
        time.sleep(POLL_S)
    records = read_jsonl(log_jsonl) if log_jsonl.exists() else []
    epoch_s = records[0].get("seconds", 0.2) if records else 0.2
    time.sleep(min(max(epoch_s * 0.5, 0.0), 5.0))
    if proc.poll() is not None:
        pytest.fail("run finished before it could be killed: make the epochs longer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return len(records)


def _reference_run_in_process(argv: list) -> None:
    """The uninterrupted run, in this process on one thread (as the subprocesses run): it overlaps the
    resumed process's start-up instead of costing a third process on a shared machine."""
    from fixres.cli.app import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)


def _assert_nothing_half_written(out: Path, state_name: str) -> dict:
    """Every file under a final name in ``out`` reads back completely; returns the saved state."""
    for p in out.iterdir():
        if p.name == LOCK_NAME:  # a killed run leaves its lock file behind, unlocked (flock dies with the process)
            continue
        if p.name.startswith("."):
            assert p.name.endswith(".tmp")  # an unfinished atomic write, never under a final name
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            load_state_dict(p)
        elif p.suffix == ".jsonl":
            read_jsonl(p)
    return load_training_state(out / state_name)


def _final_weights(out: Path, names=("model.safetensors",)) -> dict[str, torch.Tensor]:
    for name in names:
        if (out / name).exists():
            return load_state_dict(out / name)
    found = sorted(p.name for p in out.iterdir())
    pytest.fail(f"no final weights among {names} in {out}: {found}")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max()
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (max diff {diff})"


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory):
    """train/ 3 x 8 and val/ 3 x 2 small JPEGs: epochs of a few dozen steps at 32 px."""
    root = tmp_path_factory.mktemp("kill")
    write_image_folder(root / "data" / "train", classes=3, per_class=8, seed=11)
    write_image_folder(root / "data" / "val", classes=3, per_class=2, seed=12)
    return root


@pytest.mark.slow
def test_train_sigkill_mid_epoch_then_resume_equals_uninterrupted(kill_data, tmp_path):
    data = kill_data / "data"
    common = ["train", "--model", "fixres_tiny_resnet", "--data", data, "--train-size", "32", "--epochs", EPOCHS,
              "--batch-size", "4", "--repeats", "2", "--val-sizes", "32", "--workers", "0", "--seed", "3",
              "--device", "cpu", "-q", "--lr", "0.05"]
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    run = _launch([*common, "--out", run_out], tmp_path / "run.log")
    _kill_mid_epoch(run, run_out / "train_state.pt", run_out / "log.jsonl", tmp_path / "run.log")
    state = _assert_nothing_half_written(run_out, "train_state.pt")
    assert 1 <= state["epoch"] < EPOCHS, "the kill must land before the last epoch ended"
    assert not (run_out / "model.safetensors").exists()
    resumed = _launch([*common, "--out", run_out, "--resume", "--json"], tmp_path / "resume.log")
    _reference_run_in_process([*common, "--out", ref_out])  # while the resumed process starts up
    result = _wait(resumed, tmp_path / "resume.log")
    assert result["resumed_from"] == state["epoch"]  # it continued; it did not start over
    _assert_same_weights(_final_weights(ref_out), _final_weights(run_out))
    log_ref, log_run = read_jsonl(ref_out / "log.jsonl"), read_jsonl(run_out / "log.jsonl")
    assert [r["epoch"] for r in log_run] == list(range(1, EPOCHS + 1))
    assert [r["train_loss"] for r in log_run] == pytest.approx([r["train_loss"] for r in log_ref], rel=1e-6)


def _finetune_argv(data: Path, ck: Path) -> list:
    return ["finetune", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", data, "--test-size", "48",
            "--epochs", EPOCHS, "--batch-size", "4", "--workers", "0", "--seed", "3", "--device", "cpu", "-q",
            "--augment", "test2", "--lr", "0.01"]  # test DA2 is random: resuming must restore the RNG too


@pytest.mark.slow
def test_finetune_sigkill_mid_epoch_then_resume_equals_uninterrupted(kill_data, tmp_path):
    data = kill_data / "data"
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors", num_classes=3)
    common = _finetune_argv(data, ck)
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    run = _launch([*common, "--out", run_out], tmp_path / "run.log")
    _kill_mid_epoch(run, run_out / "finetune_state.pt", run_out / "finetune_log.jsonl", tmp_path / "run.log")
    state = _assert_nothing_half_written(run_out, "finetune_state.pt")
    assert 1 <= state["epoch"] < EPOCHS
    resumed = _launch([*common, "--out", run_out, "--resume", "--json"], tmp_path / "resume.log")
    _reference_run_in_process([*common, "--out", ref_out])  # while the resumed process starts up
    result = _wait(resumed, tmp_path / "resume.log")
    assert result["resumed_from_epoch"] == state["epoch"]  # it continued; it did not start over
    names = ("model.safetensors", "finetuned.safetensors")
    final = _final_weights(run_out, names)
    _assert_same_weights(_final_weights(ref_out, names), final)
    start = load_state_dict(ck)
    assert any(not torch.equal(final[k], start[k]) for k in start if k in final)  # fine-tuning changed weights


def test_atomic_files_get_normal_permissions(tmp_path):
    """Temporary files are private (0600); the final file gets the mode open() would give it (umask),
    or keeps the mode of the file it replaces."""
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "new.json", {"a": 1})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
        assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
        (tmp_path / "kept.json").write_text("{}")
        os.chmod(tmp_path / "kept.json", 0o640)
        write_json(tmp_path / "kept.json", {"b": 2})
        assert (tmp_path / "kept.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)
