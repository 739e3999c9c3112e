"""``fixres fix`` after fixing: budgets pick among the fixed candidates, temperature scaling on the
held-out images, label-free mode, what the terminal shows (plan, noise, no "nothing to resume")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import cli

from fixres.job import pipeline, plan

USER = dict(model="fixres_tiny_resnet", train_size=32, test_sizes=[32, 48], finetune_epochs=1, workers=0,
            progress=False, batch_size=8, tune_schedule=False, holdout_untouched=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("after")
    write_image_folder(tmp / "data" / "train", per_class=8, seed=1)
    write_image_folder(tmp / "data" / "val", per_class=3, seed=2)
    ck = save_tiny_checkpoint(tmp / "tiny.safetensors")
    cfg = dict(checkpoint=str(ck), data=str(tmp / "data"), out=str(tmp / "run"), **USER)
    first = pipeline.run_fix(pipeline.FixConfig(**cfg))
    return {"tmp": tmp, "cfg": cfg, "first": first, "run": tmp / "run", "ck": ck}


def test_budget_reselects_among_the_fixed_candidates_without_refixing(setup):
    run = setup["run"]
    sel = json.loads((run / "select.json").read_text())
    assert [c["test_size"] for c in sel["candidates"]] == [32, 64]
    assert all(c["ms"] > 0 and c["ms_batch"] > 0 and c["gflops"] > 0 for c in sel["candidates"])
    big, small = (next(c for c in sel["candidates"] if c["test_size"] == s) for s in (64, 32))
    assert big["gflops"] == pytest.approx(4 * small["gflops"], rel=0.05)  # a CNN's cost grows with the area
    capped = pipeline.run_fix(pipeline.FixConfig(**{**setup["cfg"], "max_test_size": 40}))
    assert capped.choice.test_size == 32 and "max size 40" in capped.choice.chosen_on
    assert "select" not in capped.recomputed  # the candidates are not fixed again for another budget
    assert ("finetune" in capped.recomputed) == (setup["first"].choice.test_size != 32)
    meta = json.loads((run / "export" / "fixres.json").read_text())
    assert meta["test_size"] == 32


def test_temperature_scaling_keeps_top1_and_is_fitted_on_held_out_images(setup):
    run = setup["run"]
    before = json.loads((run / "sweep_after.json").read_text())
    scaled = pipeline.run_fix(pipeline.FixConfig(**{**setup["cfg"], "temperature_scale": True}))
    assert set(scaled.recomputed) == {"finetune", "sweep_after", "stats", "robustness", "report"}
    ft = json.loads((run / "finetune.json").read_text())
    t = ft["temperature"]["T"]
    assert t > 0 and "held-out" in ft["temperature"]["fitted_on"]
    after = json.loads((run / "sweep_after.json").read_text())
    for b, a in zip(before["rows"], after["rows"]):
        assert a["top1"] == b["top1"]  # dividing the logits by T > 0 keeps every argmax
        if abs(t - 1.0) > 1e-3:
            assert a["nll"] != b["nll"]


def test_scale_layer_divides_the_logits_exactly():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    want = layer(x) / 2.5
    from fixres.method.calibration import scale_layer
    scale_layer(layer, 1 / 2.5)
    assert torch.allclose(layer(x), want, atol=1e-6)


def test_label_free_recalibrates_at_the_recommended_size(setup):
    out = setup["tmp"] / "label_free"
    res = pipeline.run_fix(pipeline.FixConfig(**{**setup["cfg"], "out": str(out), "label_free": True}))
    rec = json.loads((out / "analyze.json").read_text())["recommended_test_size"]
    assert res.choice.test_size == rec and res.choice.method == "label-free"
    assert not (out / "select.json").exists() and not (out / "schedule.json").exists()
    ft = json.loads((out / "finetune.json").read_text())
    assert ft["method"] == "bn-recalibrate" and ft["n_unlabeled"] == 24
    assert res.headline.top1_fixed is not None  # reported on val, which has labels


def test_terminal_shows_plan_noise_and_no_resume_message_on_a_first_run(tmp_path, capsys):
    """The planned steps with a time estimate before starting; the binomial SE and a noise verdict in
    the summary; no "nothing to resume" when nothing was asked to resume."""
    write_image_folder(tmp_path / "data" / "train", per_class=6, seed=1)
    write_image_folder(tmp_path / "data" / "val", per_class=3, seed=2)
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code, out, err = cli(capsys, "fix", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data",
                         tmp_path / "data", "--out", tmp_path / "run", "--train-size", "32", "--test-sizes", "32",
                         "--test-size", "32", "--epochs", "1", "--workers", "0", "--batch-size", "8")
    assert code == 0, err
    assert "nothing to resume" not in err
    assert "plan (" in err and "total ~" in err
    assert "binomial SE" in out and ("within noise" in out or "beyond 2 SE" in out)
    assert "\r" not in err  # no progress bar redraws when stderr is not a terminal


def test_the_plan_of_a_run_that_trains_is_printed_before_the_training(tmp_path, capsys):
    """The plan probes the model as built: a run that trains has no trained weights yet when it prints."""
    from fixres.job import pipeline
    pipeline.run_fix(pipeline.FixConfig(out=str(tmp_path / "run"), classes=3, train_per_class=6, val_per_class=3,
                                        train_size=32, test_sizes=[32, 48], train_epochs=1, finetune_epochs=1,
                                        workers=0, batch_size=8, train_batch_size=8, robustness=False,
                                        progress=True))
    err = capsys.readouterr().err
    assert "plan (" in err and err.index("plan (") < err.index("] train:")


def test_fix_summary_lists_every_candidate_before_and_after(setup, capsys):
    code, out, _ = cli(capsys, "fix", "--model", "fixres_tiny_resnet", "--checkpoint", setup["ck"], "--data",
                       Path(setup["cfg"]["data"]), "--out", setup["run"], "--train-size", "32", "--test-sizes", "32,48",
                       "--epochs", "1", "--workers", "0", "--batch-size", "8", "--no-tune-schedule",
                       "--holdout-untouched")
    assert code == 0
    rows = [ln for ln in out.splitlines() if ln.strip()[:2] in ("32", "64")]
    assert len(rows) == 2 and sum("★ chosen" in r for r in rows) == 1


def test_report_shows_candidates_frontier_reliability_and_ks(setup):
    from fixres.job.headline import write_run_report
    run = setup["run"]
    summary = write_run_report(run)
    html = Path(summary["html"]).read_text()
    assert "Every candidate size, before and after the fix" in html and html.count("★ chosen") == 1
    assert "held-out training images" in html  # says how the size was chosen
    assert {"frontier", "reliability"} <= set(summary["figures"])
    assert Path(summary["figures"]["frontier"]).stat().st_size > 1000
    assert "Kolmogorov-Smirnov" in html
    stats = json.loads((run / "stats.json").read_text())
    ks_before_at_t = stats["before"]["sizes"]["32"]["ks_to_reference"]
    assert ks_before_at_t == pytest.approx(0.0, abs=1e-9)  # the reference is the model before the fix at T
    assert all(v["ks_to_reference"] is not None for v in stats["after"]["sizes"].values())


def _plan_context(*, candidates, augment="test", n_fit=100, n_hold=20, n_val=50, epochs=4, train_size=32):
    from types import SimpleNamespace
    config = SimpleNamespace(candidates=list(candidates), test_size=None, finetune_epochs=epochs, augment=augment,
                             train_epochs=3, label_free=False, tune_schedule=True, lr=None, robustness=False,
                             robustness_images=None, stats_sizes=None)
    return SimpleNamespace(config=config, data_config=SimpleNamespace(train_size=train_size, stride=32),
                           fit=[0] * n_fit, holdout=[0] * n_hold, val_index=SimpleNamespace(samples=[0] * n_val),
                           test_sizes=[32, 64], needs_training=False,
                           env=SimpleNamespace(distributed=False, device=torch.device("cpu")))


@pytest.mark.parametrize("augment", ["test", "train"])
def test_plan_estimate_reading_does_not_grow_with_the_candidate_size(augment):
    """Decoding a photo costs about the same whatever size it is resized to: only the network's share
    scales with the area (the demo's plan said 7.6 min for a 2.1-min run when reading scaled too)."""
    read = 0.002
    small = plan.plan_estimates(_plan_context(candidates=[32], augment=augment), 0.0, read)
    large = plan.plan_estimates(_plan_context(candidates=[128], augment=augment), 0.0, read)
    cached = augment == "test"
    # the fitting photos per fine-tuning, but not for the candidate at the schedule grid's size when cached (the
    # grid's cache is handed to it); the held-out ones once, by the model before the fix (recording its
    # activations at the cut, from which every candidate is scored, on val too)
    reads = (0 if cached else 100 * 4) + 20
    assert small["select"] == pytest.approx(large["select"]) == pytest.approx(read * reads)
    # The schedule grid: 2 rates x epochs x1 and x3; cached, the first fine-tuning reads the fitting images and
    # hands its cache to the others; held-out read once.
    grid = (100 if cached else sum(100 * 4 * f for _ in (1, 10) for f in (1, 3))) + 20
    assert large["schedule"] == pytest.approx(read * grid)
    # The network's share does scale with the area: 4x the side, 16x the forward time.
    fwd = plan.plan_estimates(_plan_context(candidates=[128]), 0.001, 0.0)["select"]
    assert fwd == pytest.approx(16 * plan.plan_estimates(_plan_context(candidates=[32]), 0.001, 0.0)["select"])


def test_the_plan_trains_at_the_timed_step_when_there_is_one():
    ctx = _plan_context(candidates=[48])
    ctx.needs_training = True
    timed = plan.plan_estimates(ctx, 0.001, 0.0005, train_share=2.0)["train"]
    assumed = plan.plan_estimates(ctx, 0.001, 0.0)["train"]
    # 3 epochs of 100 fitting photos, a step of two forwards each and a read beside it: on a CPU the loader
    # workers take the cores the step runs on; on a GPU they read while it computes
    assert timed == pytest.approx(3 * 100 * (0.002 + 0.0005))
    assert assumed == pytest.approx(3 * 100 * 0.001 * plan.TRAIN_FORWARDS)
    ctx.env.device = torch.device("cuda")
    assert plan.plan_estimates(ctx, 0.001, 0.0005, train_share=2.0)["train"] == pytest.approx(3 * 100 * 0.002)


#: One measured run: lite0 transferred at 128 px on cats_vs_dogs (600 train / 800 val), default fix (cross-
#: selection, 7 sweep sizes and 7 candidates from 64 to 256 px) on a 2-core CPU with native bf16: the plan's
#: probe (a forward at T with the batch norms folded, reading one photo, a cached fine-tuning step's share of a
#: forward) and every step's measured seconds.
MEASURED_RUN = {"fwd_s": 0.0036, "load_s": 0.003, "cached_share": 0.013, "n_fit": 600, "n_seen": 120,
                "n_val": 800, "train_size": 128, "sizes": [64, 96, 128, 160, 192, 224, 256], "epochs": 10,
                "seconds": {"sweep_before": 34.0, "select": 56.1, "stats": 2.0}}
#: Steps shorter than this are start-up and bookkeeping more than work: only the total is held to them.
SHORT_STEP_S = 5.0


def test_plan_total_is_within_1_5x_of_a_measured_run():
    """The estimator pinned on a real run's timing table: an estimator change that misjudges the work by more
    than half fails here, not on a user's machine an hour later."""
    m = MEASURED_RUN
    ctx = _plan_context(candidates=m["sizes"], n_fit=m["n_fit"], n_hold=0, n_val=m["n_val"], epochs=m["epochs"],
                        train_size=m["train_size"])
    ctx.test_sizes, ctx.seen = m["sizes"], [0] * m["n_seen"]
    ctx.config.tune_schedule = False  # cross-selection: no schedule grid
    est = plan.plan_estimates(ctx, m["fwd_s"], m["load_s"], m["cached_share"])
    assert set(est) == set(m["seconds"])  # no sweep_after: nothing left to forward
    total, measured = sum(est.values()), sum(m["seconds"].values())
    assert measured / 1.5 <= total <= measured * 1.5, (est, m["seconds"])
    for step, seconds in m["seconds"].items():  # and no step of real work is off by more than 2x
        assert seconds < SHORT_STEP_S or seconds / 2 <= est[step] <= seconds * 2, (step, est[step], seconds)
        assert est[step] <= max(seconds, SHORT_STEP_S) * 2, (step, est[step], seconds)


def test_the_plans_reading_probe_keeps_each_photos_fastest_read(tmp_path, monkeypatch):
    """One read the machine delays (here a photo's first read, 0.2 s longer) does not move the reading estimate:
    each photo's fastest read is kept; an unreadable photo is timed but not kept."""
    import time as clock

    from fixres.data.folders import scan_folder
    from fixres.data.images import load_rgb
    write_image_folder(tmp_path / "photos", per_class=2, seed=0)
    samples = scan_folder(tmp_path / "photos").samples[:4] + [(str(tmp_path / "missing.jpg"), 0)]
    delayed, delay_s = {samples[1][0]}, 0.2

    def slow_once(path, **kw):
        if path in delayed:
            delayed.discard(path)
            clock.sleep(delay_s)
        return load_rgb(path, **kw)
    monkeypatch.setattr(plan, "load_rgb", slow_once)
    seconds, photos, inputs = plan.read_seconds(samples, lambda photo: photo.size)
    assert len(photos) == len(inputs) == 4 and not delayed  # the delayed read happened
    assert seconds < delay_s / len(samples) / 2
