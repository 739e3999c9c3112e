"""``fixres fix`` end to end on a tiny generated data set: every step, the export, resuming, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixres.choosing.photos import RULE_HELD_OUT
from fixres.choosing.serving import choose_test_size
from fixres.job import pipeline

TINY = dict(classes=3, train_per_class=8, val_per_class=4, train_size=32, test_sizes=[32, 48, 64], train_epochs=1,
            finetune_epochs=1, workers=0, progress=False, batch_size=16, train_batch_size=8, choose="best")


def _mtimes(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run.glob("*.json") if p.name not in ("state.json", "run.json")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fix") / "run"
    result = pipeline.run_fix(pipeline.FixConfig(out=str(run), **TINY))
    return run, result


def test_fix_runs_every_step_and_exports_a_loadable_fixed_model(tiny_run):
    from fixres.io.checkpoint import load_state_dict
    from fixres.models.loading import load_model

    run, result = tiny_run
    state = json.loads((run / "state.json").read_text())
    assert [s for s in pipeline.STEPS if state["steps"].get(s, {}).get("done")] == list(pipeline.STEPS)
    for name in ("data", "train", "analyze", "sweep_before", "finetune", "sweep_after", "stats", "export", "run"):
        assert (run / f"{name}.json").is_file(), name
    before = json.loads((run / "sweep_before.json").read_text())
    after = json.loads((run / "sweep_after.json").read_text())
    assert [r["test_size"] for r in before["rows"]] == [32, 48, 64] == [r["test_size"] for r in after["rows"]]
    assert before["n_images"] == after["n_images"] == 12

    head = result.headline
    s = result.choice.test_size
    assert s == head.test_size and s in (32, 48, 64)
    assert head.top1_at_train_size == next(r["top1"] for r in before["rows"] if r["test_size"] == 32)
    assert head.top1_fixed == next(r["top1"] for r in after["rows"] if r["test_size"] == s)
    assert head.top1_best_untuned == max(r["top1"] for r in before["rows"])

    # The export reads back with no other flag; only the classifier and the pre-pool batch-norm changed.
    fixed = load_model(checkpoint=str(run / "export" / "model.safetensors"))
    assert fixed.data_config.class_names == tuple(sorted(json.loads((run / "data.json").read_text())
                                                         ["manifest"]["classes"]))
    meta = json.loads((run / "export" / "fixres.json").read_text())
    assert meta["test_size"] == s and meta["train_size"] == 32
    assert meta["accuracy"]["top1"] == head.top1_fixed
    # Chosen on held-out training photos: every validation photo reports it without bias, and says so.
    assert meta["top1"] == head.top1_fixed and meta["top1_rule"] == RULE_HELD_OUT
    # The model card beside it says the same figure, its rule and the photos it was measured on.
    card = (run / "export" / "README.md").read_text()
    assert f"fixed at {s} px" in card and f"{head.top1_fixed:.1f} %" in card
    assert meta["accuracy"]["top1_rule_text"] in card and str(run / "data" / "val") in card
    # The served model against the untuned one on the same validation photos: paired tests, not error bars.
    paired = result.choice.paired_val
    assert paired.paired_vs_untuned is not None and paired.paired_vs_train_size is not None
    assert paired.untuned_top1 == head.top1_untuned_at_test_size
    trained = load_state_dict(run / "train" / "model.safetensors")
    exported = load_state_dict(run / "export" / "model.safetensors")
    assert trained.keys() == exported.keys()
    ft = json.loads((run / "finetune.json").read_text())
    changed = {k for k in trained if not torch.equal(trained[k], exported[k])}
    adapted = tuple(ft["trainable"]) + tuple(ft.get("stats_modules") or ())
    assert changed, "fine-tuning changed nothing"
    assert all(k.startswith(adapted) for k in changed), sorted(changed)
    assert torch.equal(trained["conv1.weight"], exported["conv1.weight"])

    stats = json.loads((run / "stats.json").read_text())
    for state_name in ("before", "after"):
        sizes = stats[state_name]["sizes"]
        assert sizes and all(len(v["x"]) == len(v["cdf"]) > 10 for v in sizes.values())
        assert all(0.0 <= v["zeros"] <= 1.0 for v in sizes.values())

    html = Path(result.report).read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html


def test_rerun_skips_finished_steps_and_continues_after_a_kill(tiny_run):
    run, first = tiny_run
    cfg = pipeline.FixConfig(out=str(run), **TINY)
    stamps = _mtimes(run)
    again = pipeline.run_fix(cfg)
    assert _mtimes(run) == stamps  # nothing recomputed
    assert again.headline.top1_fixed == first.headline.top1_fixed

    # As if killed after fine-tuning: the later steps are not recorded as done.
    state_path = run / "state.json"
    state = json.loads(state_path.read_text())
    for step in ("sweep_after", "stats", "report"):
        state["steps"].pop(step)
    state_path.write_text(json.dumps(state))
    resumed = pipeline.run_fix(cfg)
    now = _mtimes(run)
    for name in ("data.json", "train.json", "analyze.json", "sweep_before.json", "finetune.json"):
        assert now[name] == stamps[name], name
    assert now["sweep_after.json"] != stamps["sweep_after.json"]
    assert resumed.headline.top1_fixed == first.headline.top1_fixed


def test_rerun_with_changed_interpolation_recomputes_exactly_the_affected_steps(tiny_run, capsys):
    """A changed setting recomputes the steps that read it (and those downstream) and says
    which input changed; the steps that do not read it are kept; a rerun with nothing changed recomputes
    nothing."""
    run, first = tiny_run
    stamps = _mtimes(run)
    changed = pipeline.run_fix(pipeline.FixConfig(out=str(run), **{**TINY, "interpolation": "bicubic",
                                                                    "progress": True}))
    err = capsys.readouterr().err
    redo = {"train", "sweep_before", "schedule", "select", "finetune", "sweep_after", "stats", "robustness", "report"}
    assert set(changed.recomputed) == redo
    assert all("interpolation" in why for step, why in changed.recomputed.items() if step != "report")
    assert "recomputing train: changed interpolation" in err and "recomputing sweep_after:" in err
    now = _mtimes(run)
    assert now["data.json"] == stamps["data.json"] and now["analyze.json"] == stamps["analyze.json"]
    assert all(now[f"{s}.json"] != stamps[f"{s}.json"] for s in redo - {"report"})
    assert json.loads((run / "export" / "fixres.json").read_text())["interpolation"] == "bicubic"

    again = pipeline.run_fix(pipeline.FixConfig(out=str(run), **{**TINY, "interpolation": "bicubic"}))
    assert again.recomputed == {} and _mtimes(run) == now
    # Back to the first settings: recomputed again, same numbers as the first run (deterministic).
    back = pipeline.run_fix(pipeline.FixConfig(out=str(run), **TINY))
    assert set(back.recomputed) == redo
    assert back.headline.top1_fixed == first.headline.top1_fixed


def test_report_command_rebuilds_from_json(tiny_run, capsys):
    from fixres.cli.app import main
    run, _ = tiny_run
    (run / "report" / "index.html").unlink()
    assert main(["report", str(run), "-q"]) == 0
    assert (run / "report" / "index.html").is_file()
    assert main(["report", str(run / "nope")]) == 2


def test_choose_test_size_and_default_sizes():
    rows = [{"test_size": 64, "top1": 50.0}, {"test_size": 96, "top1": 58.0}, {"test_size": 128, "top1": 55.0}]
    assert choose_test_size(recommended=64, sweep_rows=rows, train_size=64)["test_size"] == 96
    assert choose_test_size(recommended=128, sweep_rows=rows, train_size=64)["test_size"] == 128
    assert pipeline.default_test_sizes(64) == [32, 64, 96, 128]  # T/2 to 2T, the candidates' range
    assert pipeline.default_test_sizes(64, step=16)[:3] == [32, 48, 64]
    sizes = pipeline.default_test_sizes(224)
    assert 224 in sizes and 288 in sizes and all(s % 32 == 0 for s in sizes)
