"""Streamed shards: read front to back (local files or ``pipe:`` commands), split by shard over ranks and loader
workers, and scored to the same numbers as the same shards indexed, every photo counted exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import write_image_folder
from helpers.cli import VENV_BIN, cli
from helpers.layouts import BROKEN, CLASSES, add_members, spread_checkpoint, write_shards

from fixres.data.folders import scan_folder
from fixres.data.streams import shards_for

TIMEOUT_S = 180
MODEL = ["--model", "fixres_tiny_resnet", "--no-amp", "-q"]
#: Photos in the val split: 4 per class and one unreadable.
VAL_PHOTOS = 3 * 4 + 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("streams")
    write_image_folder(root / "folder" / "val", per_class=4, seed=2)
    (root / "folder" / "val" / "class_1" / "img_zzz.jpg").write_bytes(BROKEN)
    val = scan_folder(root / "folder" / "val")
    write_shards(root / "shards", "val", val.samples)
    write_shards(root / "named", "val", val.samples, names=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"dir": str(root / "shards"), "named": str(root / "named"), "classes": str(root / "classes.txt"),
            "pipe": "pipe:cat " + str(root / "shards" / "val-{000000..000002}.tar"),
            "ckpt": str(spread_checkpoint(root))}


def _run(capsys, shards, out: Path, *args, command="eval") -> dict:
    code, _, err = cli(capsys, command, "--checkpoint", shards["ckpt"], *MODEL, "--out", out, *args)
    assert code == 0, err
    return json.loads((out / f"{command}.json").read_text())


def _same_numbers(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"] and a["ensembles"] == b["ensembles"]
    assert a["per_class"] == b["per_class"]
    # A skip is named by its shard as --data names it (a path, or the pipe: command) and its member.
    assert [(s["path"].split("::")[1], s["reason"]) for s in a["skipped"]] == \
        [(s["path"].split("::")[1], s["reason"]) for s in b["skipped"]]
    assert a["n_images"] == b["n_images"] and a["n_samples"] == b["n_samples"] == VAL_PHOTOS


def test_every_shard_is_read_by_exactly_one_worker_of_one_rank():
    for n, world, workers in ((3, 2, 2), (7, 3, 2), (2, 4, 3), (5, 1, 1)):
        read = [s for r in range(world) for w in range(workers) for s in shards_for(n, r, world, w, workers)]
        assert sorted(read) == list(range(n))


@pytest.mark.parametrize("decode", [["--full-decode"], []])
def test_streamed_eval_and_sweep_equal_the_indexed_shards(capsys, tmp_path, shards, decode):
    for command, sizes in (("eval", ["--test-size", "40"]), ("sweep", ["--test-sizes", "32,48"])):
        indexed = _run(capsys, shards, tmp_path / command / "i", "--data", shards["dir"], "--workers", "0", *sizes,
                       *decode, command=command)
        for name, data, workers in (("s0", shards["dir"], "0"), ("s2", shards["dir"], "2"),
                                    ("pipe", shards["pipe"], "2")):
            streamed = _run(capsys, shards, tmp_path / command / name, "--data", data, "--stream", "--workers",
                            workers, *sizes, *decode, command=command)
            _same_numbers(streamed, indexed)


def test_class_names_in_cls_stream_with_the_class_map(capsys, tmp_path, shards):
    indexed = _run(capsys, shards, tmp_path / "i", "--data", shards["dir"], "--workers", "0", "--test-size", "40")
    named = _run(capsys, shards, tmp_path / "n", "--data", shards["named"], "--stream", "--class-map",
                 shards["classes"], "--workers", "0", "--test-size", "40")
    assert named["rows"] == indexed["rows"] and named["per_class"]["classes"] == CLASSES


def test_temperature_scaling_of_a_stream_equals_the_indexed_shards(capsys, tmp_path, shards):
    """The held-out folder's classes map onto the stream's by name (the class map's): the streamed rows, the
    temperature and the scaled NLL and ECE included, equal the indexed shards'."""
    held = write_image_folder(tmp_path / "held", per_class=3, seed=7)
    common = ["--class-map", shards["classes"], "--workers", "0", "--test-size", "40", "--calibrate-on", str(held)]
    indexed = _run(capsys, shards, tmp_path / "i", "--data", shards["named"], *common)
    streamed = _run(capsys, shards, tmp_path / "s", "--data", shards["named"], "--stream", *common)
    assert "temperature" in indexed["rows"][0] and indexed["rows"][0]["nll_scaled"] is not None
    assert streamed["rows"] == indexed["rows"]
    # Numbered classes cannot be matched to the held-out folder's names: one line saying what to add.
    code, _, err = cli(capsys, "eval", "--checkpoint", shards["ckpt"], *MODEL, "--data", shards["dir"], "--stream",
                       "--workers", "0", "--test-size", "40", "--calibrate-on", str(held), "--out", tmp_path / "n")
    assert code == 2 and "name them with --class-map" in err and len(err.strip().splitlines()) == 1, err


def test_torchrun_streams_each_shard_on_one_rank_and_counts_every_photo_once(tmp_path, capsys, shards):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found in the venv")
    one = _run(capsys, shards, tmp_path / "one", "--data", shards["dir"], "--workers", "0", "--test-size", "40")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fixres", "eval", "--data",
                           shards["pipe"], "--checkpoint", shards["ckpt"], *MODEL, "--workers", "1",
                           "--test-size", "40", "--batch-size", "2", "--val-count", str(VAL_PHOTOS),
                           "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["world_size"] == 2 and two["n_samples"] == one["n_samples"] == VAL_PHOTOS
    assert len(two["skipped"]) == len(one["skipped"]) == 1
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in ("correct", "correct5", "n", "top1", "top1_std"):
            assert a[key] == b[key], key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # summed in another order across ranks


def test_a_sample_without_its_class_is_left_out_and_named(capsys, tmp_path, shards):
    photo = next(Path(shards["dir"]).parent.glob("folder/val/class_0/*.png"), None) or next(
        Path(shards["dir"]).parent.glob("folder/val/class_0/*"))
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        add_members(tar, [("a.png", photo.read_bytes()), ("a.cls", b"0"), ("b.png", photo.read_bytes())])
    code, _, err = cli(capsys, "eval", "--data", tmp_path / "x.tar", "--stream", "--checkpoint", shards["ckpt"],
                       "--model", "fixres_tiny_resnet", "--no-amp", "--workers", "0", "--test-size", "32",
                       "--out", tmp_path / "o")
    assert code == 0, err
    assert f"left out {tmp_path / 'x.tar'}::b: no .cls member" in err
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["n_samples"] == 1


def _truncated(tmp_path: Path, shards) -> str:
    whole = (Path(shards["dir"]) / "val-000001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:len(whole) // 2])
    return str(tmp_path / "cut.tar")


@pytest.mark.parametrize("data, extra, says", [
    ("pipe:cat MISSING.tar", [], "the command exited with status 1"),
    ("pipe:exit 3", [], "exited with status 3"),
    ("NAMED", [], ".cls holding class names needs their order: --class-map FILE"),
    ("PIPE", ["--val-count", "12"], "holds 13 photos (a shard or folder too many?)"),
    ("PIPE", ["--corruptions"], "--corruptions draws its photos by position"),
    ("CUT", [], "ends without its end marker"),
])
def test_streams_that_cannot_be_scored_whole_get_one_line(capsys, tmp_path, shards, data, extra, says):
    data = (data.replace("MISSING", str(tmp_path / "missing")).replace("NAMED", shards["named"])
            .replace("PIPE", shards["pipe"]).replace("CUT", _truncated(tmp_path, shards) if data == "CUT" else ""))
    code, _, err = cli(capsys, "eval", "--data", data, "--stream", "--checkpoint", shards["ckpt"], *MODEL,
                       "--workers", "0", "--test-size", "32", *extra, "--out", tmp_path / "o")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "eval.json").exists()


@pytest.mark.parametrize("command", ["fix"])
def test_commands_that_index_their_photos_refuse_a_pipe_in_one_line(capsys, tmp_path, shards, command):
    from helpers.cli import MODEL_COMMANDS
    code, _, err = cli(capsys, command, "--data", shards["pipe"], "--checkpoint", shards["ckpt"], *MODEL,
                       *MODEL_COMMANDS[command], "--out", tmp_path / "o")
    assert code == 2 and "can only be streamed" in err and len(err.strip().splitlines()) == 1, err


def test_a_stream_in_python_scores_as_its_indexed_shards(shards):
    from helpers import fp32

    from fixres.data.layouts import index_location, resolve_split
    from fixres.data.streams import open_stream
    from fixres.errors import UsageError
    from fixres.method.evaluate import evaluate
    from fixres.method.streaming import evaluate_stream
    from fixres.models.loading import ModelSpec
    bundle = ModelSpec(model="fixres_tiny_resnet", checkpoint=shards["ckpt"]).load()
    cfg = bundle.data_config
    kw = dict(test_sizes=[32], workers=0, progress=False, precision=fp32())
    indexed = evaluate(bundle.model, index_location(resolve_split(shards["dir"], "val"), warn=False), cfg, **kw)
    stream = open_stream(shards["pipe"], classes=None, num_classes=3)
    streamed = evaluate_stream(bundle.model, stream, cfg, **kw)
    assert streamed.rows == indexed.rows and streamed.n_samples == VAL_PHOTOS
    with pytest.raises(UsageError, match="evaluate_stream"):
        evaluate(bundle.model, stream, cfg, **kw)
