"""Which photos choose the fixed size: held-out training photos only when ``fix`` trained the model without
them (or the user vouches for them), else two-fold cross-selection on val, or a separate ``--select-data``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import assert_one_line_error, cli

from fixres.choosing.outcomes import outcome_bits, read_bits
from fixres.choosing.photos import (
    RULE_CROSS,
    RULE_HELD_OUT,
    RULE_SELECT_DATA,
    RULE_UNTOUCHED,
    holdout_split,
    stratified_halves,
)
from fixres.choosing.serving import cross_select
from fixres.job import candidates, pipeline

# The rules' mechanics on a fixed model: the most accurate fixed size is served (``--choose best``); what the
# default cheapest rule serves is tested in test_served_choice.py.
USER = dict(model="fixres_tiny_resnet", train_size=32, test_sizes=[32, 48], finetune_epochs=1, workers=0,
            progress=False, batch_size=8, choose="best")


def _data(root: Path) -> Path:
    write_image_folder(root / "train", per_class=8, seed=1)
    write_image_folder(root / "val", per_class=6, seed=2)
    return root


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """A checkpoint trained elsewhere (say, on every training photo), fixed with the default rule; the
    scores of the training photos are rigged to favour the largest candidate after the fix."""
    tmp = tmp_path_factory.mktemp("given")
    data = _data(tmp / "data")
    ck = save_tiny_checkpoint(tmp / "tiny.safetensors")
    real = candidates._score
    mp = pytest.MonkeyPatch()

    def rigged(x, model, name, samples, size, **kw):
        score = real(x, model, name, samples, size, **kw)
        if samples is x.seen:  # the training photos: memorised, they would flatter the largest size
            score["top1"] = 100.0 if size == max(x.candidates) else 0.0
        return score
    mp.setattr(candidates, "_score", rigged)
    try:
        cfg = pipeline.FixConfig(checkpoint=str(ck), data=str(data), out=str(tmp / "run"), **USER)
        result = pipeline.run_fix(cfg)
    finally:
        mp.undo()
    return {"cfg": cfg, "result": result, "run": tmp / "run", "data": data, "ck": ck, "tmp": tmp}


def _read(run: Path, name: str) -> dict:
    return json.loads((run / f"{name}.json").read_text())


def test_a_given_checkpoint_is_not_chosen_on_its_training_photos(given):
    run, choice = given["run"], given["result"].choice
    sel, info = _read(run, "select"), _read(run, "run")
    assert choice.rule == sel["rule"] == RULE_CROSS and "cross-selection" in choice.chosen_on
    assert sel["n_holdout"] == 0 and info["n_holdout"] == 0
    assert info["n_fit"] == 24  # fine-tuned on every training photo: none is held out for a choice
    cands = sel["candidates"]
    assert [c["test_size"] for c in cands] == [32, 64]
    assert all(c["holdout_after"] is None and c["seen_after"]["n"] == sel["n_seen"] > 0 for c in cands)
    # the rigged training photos would pick 64; the choice follows the validation halves only
    assert choice.seen_check.size_chosen_on_seen == 64
    outcomes = {c["test_size"]: read_bits(c["val_after"]["outcomes"]) for c in cands}
    labels = [int(p.parent.name.split("_")[1]) for p in sorted((given["data"] / "val").rglob("*.jpg"))]
    halves = stratified_halves(labels, seed=0)
    expect = cross_select(outcomes, halves, costs={}, train_size=32)
    assert (choice.cross.size_half_a, choice.cross.size_half_b) == (expect["size_half_a"],
                                                                                expect["size_half_b"])
    assert choice.cross.top1 == pytest.approx(expect["top1"])
    full = {s: 100.0 * sum(o) / len(o) for s, o in outcomes.items()}
    assert choice.test_size == max(full, key=lambda s: (full[s], -abs(s - 32), -s))  # exported: all of val


def test_the_cross_selected_headline_is_in_the_report_and_the_terminal(given, capsys):
    head = given["result"].headline
    assert head.headline_rule == "cross-val"
    assert head.top1_fixed == pytest.approx(given["result"].choice.cross.top1)
    html = Path(given["result"].report).read_text(encoding="utf-8")
    assert "Which photos chose: two-fold cross-selection" in html and "Cross-selection: half A" in html
    assert "choosing on them would have picked 64 px" in html
    robust = _read(given["run"], "robustness")  # the fixed model under corruptions, against the untuned one
    size = given["result"].choice.test_size
    assert robust["columns"][:2] == [f"fixed at {size}px", "untuned at 32px"] and len(robust["rows"]) == 13
    assert "Robustness under corruptions" in html
    code, out, _ = cli(capsys, "fix", "--checkpoint", given["ck"], "--data", given["data"], "--out", given["run"],
                       "--model", "fixres_tiny_resnet", "--train-size", "32", "--test-sizes", "32,48", "--epochs", "1",
                       "--workers", "0", "--batch-size", "8", "--choose", "best")
    assert code == 0
    assert "rule: two-fold cross-selection on the validation photos" in out
    assert "served, cross-selected:" in out and "train photos after" in out
    assert "for comparison: 6 training photos (the model may have trained on them)" in out
    assert "under corruptions: fixed at" in out


def test_holdout_untouched_chooses_on_the_held_out_training_photos(given):
    cfg = pipeline.FixConfig(**{**given["cfg"].__dict__, "holdout_untouched": True,
                                "out": str(given["tmp"] / "untouched")})
    result = pipeline.run_fix(cfg)
    sel = _read(Path(cfg.out), "select")
    fit, held = holdout_split(_train_samples(given["data"]), seed=0)
    assert sel["rule"] == RULE_UNTOUCHED and sel["n_holdout"] == len(held) > 0
    assert all(c["holdout_after"]["n"] == len(held) and c["seen_after"] is None for c in sel["candidates"])
    best = max(sel["candidates"], key=lambda c: (c["holdout_after"]["top1"], -abs(c["test_size"] - 32)))
    assert result.choice.test_size == best["test_size"] and result.choice.cross is None
    assert _read(Path(cfg.out), "run")["n_fit"] == len(fit)


def _train_samples(data: Path) -> list:
    from fixres.data.folders import scan_folder
    return scan_folder(data / "train").samples


def test_select_data_chooses_the_size_and_the_schedule(given, tmp_path):
    chooser = write_image_folder(tmp_path / "select", per_class=2, seed=5)
    cfg = pipeline.FixConfig(**{**given["cfg"].__dict__, "select_data": str(chooser), "out": str(tmp_path / "run"),
                                "tune_schedule": True})
    result = pipeline.run_fix(cfg)
    sel, sched = _read(tmp_path / "run", "select"), _read(tmp_path / "run", "schedule")
    assert sel["rule"] == RULE_SELECT_DATA and sel["n_holdout"] == 6 == sched["n_images"]
    assert all(c["holdout_after"]["n"] == 6 for c in sel["candidates"])
    assert "--select-data" in result.choice.chosen_on and "--select-data" in sched["how"]
    assert _read(tmp_path / "run", "run")["n_fit"] == 24  # every training photo fine-tunes


def test_a_model_fix_trains_is_chosen_on_the_photos_it_held_out_of_training(tmp_path):
    data = _data(tmp_path / "data")
    cfg = pipeline.FixConfig(model="fixres_tiny_resnet", data=str(data), out=str(tmp_path / "run"), train_size=32,
                             test_sizes=[32, 48], finetune_epochs=1, train_epochs=1, workers=0, progress=False,
                             batch_size=8, train_batch_size=8, tune_schedule=False)
    result = pipeline.run_fix(cfg)
    sel, train = _read(tmp_path / "run", "select"), _read(tmp_path / "run", "train")
    fit, held = holdout_split(_train_samples(data), seed=0)
    assert sel["rule"] == result.choice.rule == RULE_HELD_OUT
    assert sel["n_holdout"] == len(held) and train["hparams"]["n_train"] == len(fit) == 24 - len(held)


def test_stratified_halves_split_every_class_evenly_and_follow_the_seed():
    labels = [0] * 7 + [1] * 7 + [2] * 4
    halves = stratified_halves(labels, seed=0)
    for c in (0, 1, 2):
        ones = sum(h for h, y in zip(halves, labels) if y == c)
        assert ones in ({3, 4} if c < 2 else {2})
    assert abs(halves.count(0) - halves.count(1)) <= 1  # odd classes alternate their extra image
    assert stratified_halves(labels, seed=0) == halves != stratified_halves(labels, seed=1)


def test_cross_select_reports_each_half_at_the_other_halfs_choice():
    halves = [0, 0, 0, 0, 1, 1, 1, 1]
    outcomes = {32: [1, 1, 1, 0, 0, 0, 1, 0], 64: [0, 0, 1, 1, 1, 1, 1, 1]}  # A prefers 32, B prefers 64
    res = cross_select({s: [bool(v) for v in o] for s, o in outcomes.items()}, halves, costs={})
    assert (res["size_half_a"], res["size_half_b"]) == (32, 64)
    # half A is scored at 64 (B's choice): 0,0,1,1; half B at 32 (A's choice): 0,0,1,0
    assert res["pooled"] == [False, False, True, True, False, False, True, False] and res["top1"] == 37.5
    unread = cross_select({32: [None, True], 64: [None, False]}, [0, 1], costs={})
    assert unread["n"] == 1


def test_outcome_bits_round_trip_with_unread_images():
    bits = outcome_bits([True, False, True], [0, 2, 3], 5)
    assert bits == "1.01." and read_bits(bits) == [True, None, False, True, None]


def test_select_data_flags_are_checked_before_anything_runs(tmp_path, capsys):
    code, _, err = cli(capsys, "fix", "--data", tmp_path, "--select-data", tmp_path / "nowhere")
    assert code == 2
    assert_one_line_error(err, "--select-data folder not found")
    code, _, err = cli(capsys, "fix", "--data", tmp_path, "--select-data", tmp_path, "--holdout-untouched")
    assert code == 2
    assert_one_line_error(err, "give one")


def test_no_robustness_skips_the_corruption_table(given, tmp_path):
    cfg = pipeline.FixConfig(**{**given["cfg"].__dict__, "robustness": False, "out": str(tmp_path / "run")})
    pipeline.run_fix(cfg)
    assert not (tmp_path / "run" / "robustness.json").exists()
    assert (tmp_path / "run" / "report" / "report.json").is_file()


def test_the_curve_after_the_fix_reads_the_candidates_when_every_size_is_one(given, tmp_path, monkeypatch):
    """Every swept size a candidate: the sweep after the fix is each size fixed at its own size, read from
    the select step (the candidate at S is the exported model), with no new forward."""
    from fixres.job import steps
    from fixres.method import cutcache
    from fixres.report.page import AFTER_EACH_FIXED
    calls = []
    for module in (steps, cutcache):  # the sweep before the fix runs through the cut cache's recording
        real = module.evaluate

        def spy(model, samples, *a, _real=real, **kw):
            if getattr(samples, "root", None) is not None:  # val (the choosing photos are lists)
                calls.append(kw.get("test_sizes"))
            return _real(model, samples, *a, **kw)
        monkeypatch.setattr(module, "evaluate", spy)
    cfg = pipeline.FixConfig(**{**given["cfg"].__dict__, "test_sizes": [32, 64], "out": str(tmp_path / "run"),
                                "robustness": False})
    result = pipeline.run_fix(cfg)
    assert calls == [[32, 64]]  # the sweep before the fix only
    after, sel = _read(tmp_path / "run", "sweep_after"), _read(tmp_path / "run", "select")
    assert after["after"] == AFTER_EACH_FIXED and [r["test_size"] for r in after["rows"]] == [32, 64]
    for r, c in zip(after["rows"], sel["candidates"]):
        assert r["top1"] == c["val_after"]["top1"] and r["test_size"] == c["test_size"]
    s = result.choice.test_size
    meta = json.loads((tmp_path / "run" / "export" / "fixres.json").read_text())
    assert meta["accuracy"]["top1"] == next(c["val_after"]["top1"] for c in sel["candidates"] if c["test_size"] == s)
    html = Path(result.report).read_text(encoding="utf-8")
    assert "each size at its own size" in html
