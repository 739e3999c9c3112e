"""Latency on ONNX Runtime: each size exported to ONNX and timed like PyTorch's latency; the select step's costs
then read it, with PyTorch's beside it."""

from __future__ import annotations

import json

import pytest

from fixres.models.loading import create_model
from fixres.models.onnxrt import LATENCY_RUNTIMES, ONNXRUNTIME, on_runtime, onnxruntime_costs


def _needs_runtime():
    for name in ("onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(name)


def test_each_size_is_timed_in_onnx_runtime():
    _needs_runtime()
    model = create_model("fixres_tiny_resnet", num_classes=3)[0].eval()
    costs = onnxruntime_costs(model, [48, 32], batch=2)
    assert sorted(costs) == [32, 48]
    for row in costs.values():
        assert row["ms"] > 0 and row["ms_batch"] > 0 and row["batch"] == 2
        assert row["ms_spread"][0] <= row["ms"] <= row["ms_spread"][1]
        assert isinstance(row["ms_overlaps"], bool)


def test_the_runtime_latency_replaces_pytorchs_which_stays_beside_it():
    torch_costs = {32: {"ms": 1.0, "ms_batch": 0.5, "gflops": 0.1, "ms_spread": [0.9, 1.1]}}
    ort = {32: {"ms": 0.4, "ms_batch": 0.2, "ms_spread": [0.3, 0.5], "ms_overlaps": False, "batch": 16}}
    row = on_runtime(torch_costs, ort, ONNXRUNTIME)[32]
    assert (row["ms"], row["ms_batch"], row["ms_torch"], row["ms_batch_torch"]) == (0.4, 0.2, 1.0, 0.5)
    assert row["gflops"] == 0.1 and row["latency_on"] == ONNXRUNTIME and row["ms_spread"] == [0.3, 0.5]


@pytest.mark.parametrize("command", ["fix", "eval"])
def test_the_cli_offers_the_runtimes_the_library_knows(command):
    from fixres.cli.app import build_parser
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in parser._actions if "--latency-on" in a.option_strings)
    assert tuple(action.choices) == LATENCY_RUNTIMES and action.default == LATENCY_RUNTIMES[0]


def test_eval_times_the_test_size_in_both_runtimes(capsys, tmp_path):
    _needs_runtime()
    from helpers import write_image_folder
    from helpers.cli import cli
    data = write_image_folder(tmp_path / "val", classes=2, per_class=2)
    code, out, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--num-classes", "2", "--random-init",
                         "--data", data, "--test-size", "32", "--workers", "0", "--latency-on", "onnxruntime",
                         "--out", tmp_path / "o")
    assert code == 0, err
    assert "latency at 32 px:" in out and "ms/image in onnxruntime" in out and "in PyTorch" in out
    row = json.loads((tmp_path / "o" / "eval.json").read_text())["latency"]["32"]
    assert row["ms"] > 0 and row["ms_torch"] > 0 and row["latency_on"] == ONNXRUNTIME


def test_fix_chooses_on_onnx_runtime_latency_and_says_so(tmp_path):
    _needs_runtime()
    from fixres.io.schema import parse
    from fixres.io.served import CandidateTable
    from fixres.job import pipeline
    from fixres.report.choice import candidate_columns
    run = tmp_path / "run"
    pipeline.run_fix(pipeline.FixConfig(out=str(run), classes=2, train_per_class=6, val_per_class=4, train_size=32,
                                        test_sizes=[32, 48], train_epochs=1, finetune_epochs=1, workers=0,
                                        progress=False, batch_size=16, train_batch_size=8, robustness=False,
                                        latency_on=ONNXRUNTIME, budget_ms=1000.0))
    rows = json.loads((run / "select.json").read_text())["candidates"]
    assert rows and all(r["latency_on"] == ONNXRUNTIME and r["ms_torch"] > 0 and r["ms"] > 0 for r in rows)
    table = parse(CandidateTable, json.loads((run / "select.json").read_text()))
    assert ("ms_torch", "ms/image (batch 1), PyTorch") in candidate_columns(table)
    assert ("ms", "ms/image (batch 1), onnxruntime") in candidate_columns(table)
