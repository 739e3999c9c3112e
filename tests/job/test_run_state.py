"""``state.json`` of a resumable run (fixres.job.runstate: "fix --restart and a corrupt state.json"):
a corrupt, undecodable, non-object or older state file starts the run over (never a traceback), --restart
ignores the old one, and a step is redone exactly when its inputs changed, it did not finish, or its
result file is gone."""

from __future__ import annotations

import json

import pytest

from fixres.job.runstate import NOT_RUN, OLD_STATE, OUTPUT_MISSING, STATE_NAME, STATE_VERSION, RunState

KEY = {"interpolation": "bilinear", "lr": 0.01, "data": "abc123"}


def _finished(run_dir, output=None) -> RunState:
    state = RunState(run_dir)
    state.begin("train", KEY)
    state.finish("train", KEY, seconds=1.23456)
    if output is not None:
        output.write_text("{}")
    return state


def test_a_finished_step_with_the_same_inputs_is_up_to_date_after_reopening(tmp_path):
    out = tmp_path / "train.json"
    first = _finished(tmp_path, out)
    assert first.ran == ["train"] and first.timings() == {"train": 1.235}
    again = RunState(tmp_path)
    assert again.stale("train", dict(KEY), out) is None and again.ran == []
    assert again.stale("sweep", KEY, None) == [NOT_RUN]


def test_a_step_is_redone_naming_what_changed_or_why(tmp_path):
    out = tmp_path / "train.json"
    _finished(tmp_path, out)
    state = RunState(tmp_path)
    assert state.stale("train", {**KEY, "lr": 0.02}, out) == ["lr"]
    assert state.stale("train", {**KEY, "lr": 0.02, "mean": [0.5] * 3}, out) == ["lr", "mean"]  # new input too
    out.unlink()
    assert state.stale("train", KEY, out) == [OUTPUT_MISSING]


def test_an_interrupted_step_resumes_only_with_the_same_inputs(tmp_path):
    state = RunState(tmp_path)
    state.begin("finetune", KEY)
    reopened = RunState(tmp_path)  # as after a kill
    assert reopened.stale("finetune", KEY, None) == [NOT_RUN]
    assert reopened.partial_matches("finetune", KEY)
    assert not reopened.partial_matches("finetune", {**KEY, "interpolation": "bicubic"})
    assert not reopened.partial_matches("train", KEY)
    reopened.forget("finetune")
    assert RunState(tmp_path).record("finetune") is None


@pytest.mark.parametrize("content", [b'{"version": 2, "steps": {"train": ', b"\xff\xfe not utf-8", b"[1, 2, 3]",
                                     b'"a string"', b""], ids=["truncated", "undecodable", "list", "string", "empty"])
def test_a_corrupt_state_file_starts_the_run_over(tmp_path, content):
    (tmp_path / STATE_NAME).write_bytes(content)
    state = RunState(tmp_path)
    assert not state.old_format and state.steps == {}
    assert state.stale("train", KEY, None) == [NOT_RUN]
    state.begin("train", KEY)  # and the next write replaces it with a valid one
    written = json.loads((tmp_path / STATE_NAME).read_text())
    assert written["steps"]["train"]["done"] is False and written["version"] == STATE_VERSION


def test_an_older_state_file_is_named_as_such(tmp_path):
    (tmp_path / STATE_NAME).write_text(json.dumps({"version": STATE_VERSION - 1, "steps": {"train": {"done": True}}}))
    state = RunState(tmp_path)
    assert state.old_format and state.steps == {}
    assert state.stale("train", KEY, None) == [OLD_STATE]


def test_restart_ignores_a_valid_state_file(tmp_path):
    out = tmp_path / "train.json"
    _finished(tmp_path, out)
    state = RunState(tmp_path, restart=True)
    assert state.steps == {} and state.stale("train", KEY, out) == [NOT_RUN]
