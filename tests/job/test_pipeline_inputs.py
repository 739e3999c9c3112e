"""``fixres fix`` on a user's model and data: inputs fingerprinted, val classes by name, the size chosen on
held-out training images, the model built once, nothing written for a refused data set, short functions."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO, save_tiny_checkpoint, write_image_folder

from fixres.errors import UsageError
from fixres.job import pipeline

USER = dict(model="fixres_tiny_resnet", train_size=32, test_sizes=[32, 48], finetune_epochs=1, workers=0,
            progress=False, batch_size=8)


def _data(root: Path, *, val_classes: int = 3) -> Path:
    write_image_folder(root / "train", per_class=8, seed=1)
    write_image_folder(root / "val", classes=val_classes, per_class=3, seed=2)
    return root


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A fix run of a given checkpoint; load_model is counted (the model is built once)."""
    import fixres.models.loading as models
    tmp = tmp_path_factory.mktemp("user")
    data = _data(tmp / "data")
    ck = save_tiny_checkpoint(tmp / "tiny.safetensors")
    calls = []
    real = models.load_model

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(models, "load_model", counting)  # every command builds its model through ModelSpec.load
    try:
        # the user vouches that the checkpoint never trained on the held-out photos (the default for a given
        # checkpoint, cross-selection on val, is tested in test_selection_rules)
        cfg = pipeline.FixConfig(checkpoint=str(ck), data=str(data), out=str(tmp / "run"), holdout_untouched=True,
                                 **USER)
        result = pipeline.run_fix(cfg)
    finally:
        mp.undo()
    return {"cfg": cfg, "result": result, "run": tmp / "run", "ck": ck, "data": data, "calls": calls}


def test_the_model_is_built_once(user_run):
    assert len(user_run["calls"]) == 1, user_run["calls"]


def test_test_size_is_chosen_on_held_out_training_images_not_on_val(user_run):
    """Every candidate is fixed at its own size, the size is chosen on a held-out part
    of train/ after fixing (never on val), and the fine-tuning never sees the held-out images."""
    from fixres.data.folders import scan_folder
    run = user_run["run"]
    assert (run / "select.json").is_file(), "no record of how the size was chosen"
    from fixres.choosing.best import best_row
    from fixres.choosing.photos import holdout_split
    sel = json.loads((run / "select.json").read_text())
    train = scan_folder(user_run["data"] / "train")
    fit, held = holdout_split(train.samples, seed=0)
    assert sel["method"] == "held-out-untouched" and sel["n_holdout"] == len(held) > 0
    cands = sel["candidates"]
    assert [c["test_size"] for c in cands] == [32, 64] and all(c["holdout_after"]["n"] == len(held) for c in cands)
    assert all(c["val_after"]["n"] == c["val_before"]["n"] == 9 for c in cands)
    best = best_row([{"test_size": c["test_size"], "top1": c["holdout_after"]["top1"]} for c in cands],
                    train_size=32)["test_size"]
    choice = user_run["result"].choice
    assert choice.test_size == best and "held-out training images" in choice.chosen_on
    ft = json.loads((run / "finetune.json").read_text())
    assert ft["test_size"] == best
    assert json.loads((run / "run.json").read_text())["n_fit"] == len(fit) == len(train.samples) - len(held)
    # the exported model is the chosen candidate: its val top-1 at S is the candidate's
    after = json.loads((run / "sweep_after.json").read_text())
    at_s = next(r for r in after["rows"] if r["test_size"] == best)["top1"]
    assert at_s == next(c for c in cands if c["test_size"] == best)["val_after"]["top1"]


def test_changed_checkpoint_file_recomputes_the_steps_that_read_it(user_run):
    """The checkpoint is keyed by its content, not its name."""
    run = user_run["run"]
    same = pipeline.run_fix(user_run["cfg"])
    assert same.recomputed == {}
    analyze_mtime = (run / "analyze.json").stat().st_mtime_ns
    save_tiny_checkpoint(user_run["ck"], seed=1)  # other weights under the same path
    again = pipeline.run_fix(user_run["cfg"])
    assert set(again.recomputed) == {"sweep_before", "schedule", "select", "finetune", "sweep_after", "stats",
                                       "robustness", "report"}
    assert all("checkpoint_sha256" in why for s, why in again.recomputed.items() if s != "report")
    assert (run / "analyze.json").stat().st_mtime_ns == analyze_mtime


def test_val_is_scored_under_the_training_classes_by_name(tmp_path):
    """Val/ without one of train's classes is mapped by name, not by its own sorted folders."""
    import torch

    from fixres.data.folders import scan_folder
    from fixres.method.evaluate import evaluate
    from fixres.models.loading import load_model
    data = _data(tmp_path / "data")
    shutil.rmtree(data / "val" / "class_1")
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors", seed=3)
    cfg = pipeline.FixConfig(checkpoint=str(ck), data=str(data), out=str(tmp_path / "run"),
                             **{**USER, "test_size": 32, "test_sizes": [32]})
    pipeline.run_fix(cfg)
    before = json.loads((tmp_path / "run" / "sweep_before.json").read_text())
    assert before["per_class"]["classes"][:3] == ["class_0", "class_1", "class_2"]
    assert before["per_class"]["n"][:3] == [3, 0, 3]
    bundle = load_model(model="fixres_tiny_resnet", checkpoint=str(ck), train_size=32)
    torch.manual_seed(0)
    val = scan_folder(data / "val", class_map=scan_folder(data / "train").classes)  # by name
    want = evaluate(bundle.model, val, bundle.data_config, test_sizes=[32], workers=0, progress=False, batch_size=8)
    assert before["rows"][0]["top1"] == want.rows[0].top1


def test_refused_data_set_leaves_nothing_behind(tmp_path):
    """The data set is validated before anything is written to the run folder."""
    data = _data(tmp_path / "data")
    (data / "train" / "class_9").mkdir()  # an empty class folder is refused
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors")
    out = tmp_path / "run"
    with pytest.raises(UsageError):
        pipeline.run_fix(pipeline.FixConfig(checkpoint=str(ck), data=str(data), out=str(out), **USER))
    assert not out.exists()


def _long_functions(path: Path, limit: int = 80) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_fix_job_is_a_table_of_short_steps():
    """One function per step and a table of steps; no function over 80 lines."""
    files = [REPO / "src" / "fixres" / f for f in ("job/pipeline.py", "job/steps.py", "job/keys.py", "job/context.py",
                                                   "job/plan.py", "cli/fix.py", "job/candidates.py",
                                                   "choosing/serving.py", "job/fingerprint.py", "job/runstate.py")]
    assert [f for p in files for f in _long_functions(p)] == []
    assert [s.name for s in pipeline.STEP_TABLE] == list(pipeline.STEPS)
    assert len({s.run for s in pipeline.STEP_TABLE}) == len(pipeline.STEP_TABLE)
