"""What ``fix`` serves: the cheapest candidate (each size fixed, and the model as trained at each size) whose
top-1 on the choosing photos is not below the best's beyond noise; its unbiased accuracy in the export."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny_checkpoint, write_image_folder

from fixres.choosing.serving import choose_served, cross_select_served, option_name, served_sentence
from fixres.choosing.significance import paired_test
from fixres.errors import UsageError
from fixres.job import pipeline


def _option(kind, size, hits, n=100, gflops=None, ms=None):
    outcomes = [True] * hits + [False] * (n - hits)
    return {"kind": kind, "test_size": size, "top1": 100.0 * hits / n, "outcomes": outcomes,
            "gflops": gflops if gflops is not None else size * size / 1e4, "ms": ms}


def test_nothing_beats_the_model_as_trained_beyond_noise_so_it_is_served():
    # A fixed 96 px model one photo ahead of the untuned model at 64 px: noise, and 2.25x the cost.
    options = [_option("untuned", 64, 55), _option("fixed", 64, 55), _option("untuned", 96, 54),
               _option("fixed", 96, 56)]
    choice = choose_served(options, train_size=64)
    assert option_name(choice["best"]) == "96px fixed"
    assert option_name(choice["option"]) == "64px untuned"
    assert choice["p_vs_best"] >= 0.05 and choice["cost_key"] == "gflops"
    sentence = served_sentence(choice)
    assert sentence.startswith("nothing beats 64 px untuned beyond noise") and "serve it as trained" in sentence
    # --choose best keeps the argmax among the fixed candidates.
    best = choose_served(options, mode="best", train_size=64)
    assert option_name(best["option"]) == "96px fixed"


def test_a_fix_that_wins_beyond_noise_is_served():
    # The fixed 96 px model is right on 20 photos the untuned one misses and wrong on none of its hits.
    untuned = _option("untuned", 64, 50)
    fixed = {**_option("fixed", 96, 70)}
    fixed["outcomes"] = [True] * 50 + [True] * 20 + [False] * 30
    choice = choose_served([untuned, fixed, _option("fixed", 64, 51)], train_size=64)
    assert paired_test(untuned["outcomes"], fixed["outcomes"])["p"] < 0.05
    assert option_name(choice["option"]) == "96px fixed" and choice["as_good"] == ["96px fixed"]
    assert served_sentence(choice).startswith("serve 96px fixed: the most accurate candidate")


def test_equal_cost_goes_to_the_untuned_model_and_latency_is_used_without_gflops():
    a, b = _option("fixed", 64, 60), _option("untuned", 64, 60)
    assert choose_served([a, b], train_size=64)["option"]["kind"] == "untuned"
    slow = {**_option("untuned", 64, 60, ms=5.0), "gflops": None}
    fast = {**_option("fixed", 96, 60, ms=2.0), "gflops": None}
    choice = choose_served([slow, fast], train_size=64)
    assert choice["cost_key"] == "ms" and option_name(choice["option"]) == "96px fixed"


def test_budget_and_bad_mode():
    options = [_option("untuned", 64, 50), _option("fixed", 128, 90)]
    assert choose_served(options, max_size=100)["option"]["test_size"] == 64
    with pytest.raises(UsageError, match="no candidate size fits the budget"):
        choose_served(options, max_size=32)
    with pytest.raises(UsageError, match="unknown choice rule"):
        choose_served(options, mode="fastest")


def test_cross_selection_applies_the_same_rule_on_each_half():
    n = 40
    halves = [i % 2 for i in range(n)]
    untuned = _option("untuned", 64, 20, n=n)
    fixed = _option("fixed", 96, 21, n=n)
    res = cross_select_served([untuned, fixed], halves, train_size=64)
    assert res["half_a"] == res["half_b"] == "64px untuned"  # one photo ahead is noise on each half
    assert res["pooled"] == untuned["outcomes"] and res["top1"] == pytest.approx(50.0)


# --------------------------------------------------------------------------- the job end to end

@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A given tiny random model (chance accuracy everywhere): nothing the fix does beats it beyond noise."""
    tmp = tmp_path_factory.mktemp("served")
    write_image_folder(tmp / "data" / "train", per_class=8, seed=1)
    write_image_folder(tmp / "data" / "val", per_class=6, seed=2)
    ck = save_tiny_checkpoint(tmp / "tiny.safetensors")
    cfg = pipeline.FixConfig(checkpoint=str(ck), data=str(tmp / "data"), out=str(tmp / "run"),
                             model="fixres_tiny_resnet", train_size=32, test_sizes=[32, 48], finetune_epochs=1,
                             workers=0, progress=False, batch_size=8, robustness_images=6)
    return {"result": pipeline.run_fix(cfg), "run": tmp / "run"}


def test_the_model_as_trained_is_exported_when_nothing_beats_it(served_run):
    import torch
    from safetensors.torch import load_file
    choice, run = served_run["result"].choice, served_run["run"]
    assert choice.kind == "untuned" and choice.choose == "cheapest"
    assert "serve it as trained" in choice.served
    exported = load_file(str(run / "export" / "model.safetensors"))
    given = load_file(str(run.parent / "tiny.safetensors"))
    assert all(torch.equal(exported[k], given[k]) for k in given)  # nothing fine-tuned
    ft = json.loads((run / "finetune.json").read_text())
    assert ft["served"] == "untuned" and ft["epochs"] == 0


def test_served_as_trained_still_compares_the_best_fixed_candidate_under_corruptions(served_run):
    choice, run = served_run["result"].choice, served_run["run"]
    robust = json.loads((run / "robustness.json").read_text())
    f = choice.best_fixed_size
    assert f in (32, 48) and robust["columns"][0] == f"fixed at {f}px"
    assert "untuned at 32px" in robust["columns"]


def test_fix_measures_on_fully_decoded_photos(tmp_path, monkeypatch):
    """Every evaluation of fix decodes the photos at full size, as the export's serving transform does."""
    from fixres.job import candidates, steps
    from fixres.method import cutcache
    seen = []
    for module in (candidates, steps, cutcache):
        real = module.evaluate

        def spy(*args, _real=real, **kw):
            seen.append(kw.get("reduced_decode", True))
            return _real(*args, **kw)
        monkeypatch.setattr(module, "evaluate", spy)
    write_image_folder(tmp_path / "data" / "train", per_class=4, seed=1)
    write_image_folder(tmp_path / "data" / "val", per_class=3, seed=2)
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    pipeline.run_fix(pipeline.FixConfig(checkpoint=str(ck), data=str(tmp_path / "data"), out=str(tmp_path / "run"),
                                        model="fixres_tiny_resnet", train_size=32, test_sizes=[32, 48],
                                        finetune_epochs=1, workers=0, progress=False, batch_size=8,
                                        robustness=False))
    assert len(seen) >= 3 and not any(seen)


def test_the_export_states_the_unbiased_top1_and_its_rule(served_run):
    run = served_run["run"]
    meta = json.loads((run / "export" / "fixres.json").read_text())
    cross = served_run["result"].choice.cross
    assert meta["top1_rule"] == "cross-val" and meta["top1"] == pytest.approx(cross.top1)
    assert meta["accuracy"]["top1"] == meta["top1"]
    assert "top1_all_val_optimistic" in meta["accuracy"]  # the all-val figure only under a name that says so
    head = served_run["result"].headline
    assert head.served_kind == "untuned" and head.top1_served == pytest.approx(cross.top1)
    assert head.best_untuned_optimistic is True


def test_the_terminal_says_what_is_served_and_labels_the_maximum_optimistic(served_run, capsys):
    from helpers.cli import cli
    run = served_run["run"]
    code, out, _ = cli(capsys, "fix", "--checkpoint", run.parent / "tiny.safetensors", "--data", run.parent / "data",
                       "--out", run, "--model", "fixres_tiny_resnet", "--train-size", "32", "--test-sizes", "32,48",
                       "--epochs", "1", "--workers", "0", "--batch-size", "8", "--no-robustness")
    assert code == 0
    assert "served at 32px (as trained)" in out and "± = binomial standard error" in out
    assert "  served: " in out and "optimistic" in out
    assert "paired p" in out


# --------------------------------------------------------------------------- photos that must not choose or report

def test_select_data_that_is_the_validation_folder_is_refused(tmp_path, capsys):
    from helpers.cli import assert_one_line_error, cli
    write_image_folder(tmp_path / "data" / "train", per_class=4, seed=1)
    write_image_folder(tmp_path / "data" / "val", per_class=3, seed=2)
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    common = ("fix", "--checkpoint", ck, "--model", "fixres_tiny_resnet", "--train-size", "32", "--data",
              tmp_path / "data", "--workers", "0")
    code, _, err = cli(capsys, *common, "--select-data", tmp_path / "data" / "val", "--out", tmp_path / "r1")
    assert code == 2
    assert_one_line_error(err, "--select-data holds 9 of the validation photos reported")
    (tmp_path / "link").symlink_to(tmp_path / "data" / "val")  # the same files under another name
    code, _, err = cli(capsys, *common, "--select-data", tmp_path / "link", "--out", tmp_path / "r2")
    assert code == 2 and "validation photos reported" in err
    code, _, err = cli(capsys, *common, "--select-data", tmp_path / "data" / "train", "--out", tmp_path / "r3")
    assert code == 2 and "training photos the fix fine-tunes on" in err


def test_one_folder_without_splits_never_reports_a_photo_it_fitted_on(tmp_path):
    write_image_folder(tmp_path / "flat", per_class=10, seed=3)
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    cfg = pipeline.FixConfig(checkpoint=str(ck), data=str(tmp_path / "flat"), out=str(tmp_path / "run"),
                             model="fixres_tiny_resnet", train_size=32, test_sizes=[32], test_size=32,
                             finetune_epochs=1, workers=0, progress=False, batch_size=8, robustness=False)
    pipeline.run_fix(cfg)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    split = run["split"]
    assert split["n_val"] == 6 and split["n_train"] == 24  # 20 % of every class of 10, seeded
    val = set(split["val_photos"])
    sweep = json.loads((tmp_path / "run" / "sweep_before.json").read_text())
    assert sweep["n_images"] == 6
    assert run["n_fit"] == 24  # fine-tuned on the other photos only
    # The same seed gives the same split on a rerun.
    again = pipeline.run_fix(cfg)
    assert set(json.loads((tmp_path / "run" / "run.json").read_text())["split"]["val_photos"]) == val
    assert again.choice.test_size == 32


@pytest.mark.parametrize("command", [["finetune", "--test-size", "48"], ["adapt", "--method", "bn-recalibrate"]])
def test_finetune_and_adapt_on_one_folder_refuse_rather_than_report_fitted_photos(tmp_path, capsys, command):
    from helpers.cli import assert_one_line_error, cli
    write_image_folder(tmp_path / "flat", per_class=4, seed=3)
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code, _, err = cli(capsys, *command, "--checkpoint", ck, "--model", "fixres_tiny_resnet", "--train-size", "32",
                       "--data", tmp_path / "flat", "--workers", "0", "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "no train/ and val/ folders", "fitted on")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_finetune_refuses_val_photos_that_are_training_photos_under_another_name(tmp_path, capsys):
    from helpers.cli import assert_one_line_error, cli
    root = tmp_path / "data"
    write_image_folder(root / "train", per_class=4, seed=3)
    (root / "val").symlink_to(root / "train")  # the same photos, another path
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code, _, err = cli(capsys, "finetune", "--checkpoint", ck, "--model", "fixres_tiny_resnet", "--train-size", "32",
                       "--data", root, "--workers", "0", "--test-size", "48", "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "validation photos are also training photos")
