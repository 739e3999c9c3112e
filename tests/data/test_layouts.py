"""The three data layouts give the same numbers: an ImageFolder tree, WebDataset shards, a Hugging Face dataset.

The same generated photos (one of them unreadable) are written as a folder, as 3 tar shards of unequal size per
split, as a ``save_to_disk`` dataset and as a folder of parquet files; every command reads each layout through
``fixres.data.layouts`` and must give the numbers the folder gives, to the bit (``--full-decode``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import write_image_folder
from helpers.cli import VENV_BIN, cli
from helpers.layouts import BROKEN, CLASSES, add_members, spread_checkpoint, write_shards

from fixres.data.folders import scan_folder
from fixres.data.layouts import resolve_split
from fixres.data.shards import expand_braces, index_shards, resolve_shards
from fixres.errors import UsageError

TIMEOUT_S = 180


def _write_hf(root: Path, splits: dict) -> tuple[Path, Path]:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    built = {name: datasets.Dataset.from_dict({"image": [{"bytes": Path(p).read_bytes(), "path": None}
                                                        for p, _ in samples],
                                              "label": [y for _, y in samples]}, features=feats)
             for name, samples in splits.items()}
    datasets.DatasetDict(built).save_to_disk(str(root / "hf"))
    for name, ds in built.items():
        ds.to_parquet(str(root / "parquet" / f"{name}-00000-of-00001.parquet"))
    return root / "hf", root / "parquet"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    os.environ.setdefault("HF_DATASETS_CACHE", str(root / "hf-cache"))
    write_image_folder(root / "folder" / "train", per_class=8, seed=1)
    write_image_folder(root / "folder" / "val", per_class=4, seed=2)
    (root / "folder" / "val" / "class_1" / "img_zzz.jpg").write_bytes(BROKEN)
    train, val = scan_folder(root / "folder" / "train"), scan_folder(root / "folder" / "val")
    write_shards(root / "shards", "train", train.samples)
    write_shards(root / "shards", "val", val.samples)
    found = {"folder": str(root / "folder"), "shards": str(root / "shards")}
    try:
        hf, parquet = _write_hf(root, {"train": train.samples, "validation": val.samples})
        found.update({"hf": f"hf:{hf}", "parquet": f"hf:{parquet}"})
    except pytest.skip.Exception:
        pass
    found["ckpt"] = str(spread_checkpoint(root))
    return found


def _layout(layouts, name):
    if name not in layouts:
        pytest.skip("the datasets library is not installed")
    return layouts[name]


MODEL = ["--model", "fixres_tiny_resnet", "--no-amp", "--workers", "0", "-q"]


def _eval(capsys, layouts, name, out: Path, command="eval", *extra) -> dict:
    code, _, err = cli(capsys, command, "--data", _layout(layouts, name), "--checkpoint", layouts["ckpt"], *MODEL,
                       "--full-decode", "--out", out, *extra)
    assert code == 0, err
    return json.loads((out / f"{command}.json").read_text())


@pytest.mark.parametrize("name", ["shards", "hf", "parquet"])
def test_eval_and_sweep_give_the_folders_numbers_to_the_bit(capsys, tmp_path, layouts, name):
    for command, extra in (("eval", ("--test-size", "40")), ("sweep", ("--test-sizes", "32,48"))):
        folder = _eval(capsys, layouts, "folder", tmp_path / f"f-{command}", command, *extra)
        other = _eval(capsys, layouts, name, tmp_path / f"o-{command}", command, *extra)
        assert other["rows"] == folder["rows"]
        assert other["n_images"] == folder["n_images"] == 3 * 4
        assert len(other["skipped"]) == len(folder["skipped"]) == 1
        assert other["skipped"][0]["reason"] == folder["skipped"][0]["reason"]


@pytest.mark.parametrize("name", ["shards", "hf"])
def test_finetune_gives_the_folders_weights(capsys, tmp_path, layouts, name):
    from safetensors.torch import load_file
    weights = {}
    for layout in ("folder", name):
        out = tmp_path / layout
        code, _, err = cli(capsys, "finetune", "--data", _layout(layouts, layout), "--checkpoint", layouts["ckpt"],
                           *MODEL, "--test-size", "40", "--epochs", "1", "--batch-size", "8", "--out", out)
        assert code == 0, err
        weights[layout] = load_file(out / "model.safetensors")
    assert all(torch.equal(weights["folder"][k], weights[name][k]) for k in weights["folder"])


def test_fix_gives_the_folders_choice_and_figures(tmp_path, capsys, layouts):
    results = {}
    for layout in ("folder", "shards", "hf"):
        code, _, err = cli(capsys, "fix", "--data", _layout(layouts, layout), "--checkpoint", layouts["ckpt"], *MODEL,
                           "--train-size", "32", "--test-sizes", "32,48", "--epochs", "1", "--batch-size", "8",
                           "--no-robustness", "--out", tmp_path / layout)
        assert code == 0, err
        results[layout] = json.loads((tmp_path / layout / "export" / "fixres.json").read_text())
    for layout in ("shards", "hf"):
        assert results[layout]["accuracy"] == results["folder"]["accuracy"]
        assert results[layout]["test_size"] == results["folder"]["test_size"]


def test_torchrun_scores_every_sample_of_unequal_shards_once(tmp_path, capsys, layouts):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found in the venv")
    one = _eval(capsys, layouts, "shards", tmp_path / "one", "eval", "--test-size", "40")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pattern = os.path.join(layouts["shards"], "val-{000000..000002}.tar")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fixres", "eval", "--data",
                           pattern, "--checkpoint", layouts["ckpt"], *MODEL, "--full-decode", "--test-size", "40",
                           "--batch-size", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["world_size"] == 2
    in_shards = len(index_shards(resolve_shards(pattern, "val"), warn=False).samples)
    assert two["n_samples"] == one["n_samples"] == in_shards == 3 * 4 + 1
    assert one["skipped"] == two["skipped"] and len(two["skipped"]) == 1
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in ("correct", "correct5", "n", "top1", "top1_std"):
            assert a[key] == b[key], key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # summed in another order across ranks


def test_brace_patterns_expand_with_their_padding():
    assert expand_braces("d/train-{000008..000010}.tar") == [f"d/train-{k:06d}.tar" for k in (8, 9, 10)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]


def test_a_folder_of_shards_splits_by_name_and_orders_like_a_folder(layouts):
    train = resolve_split(layouts["shards"], "train")
    val = resolve_split(layouts["shards"], "val")
    assert [Path(s).name for s in train.shards] == [f"train-{k:06d}.tar" for k in range(3)]
    assert [Path(s).name for s in val.shards] == [f"val-{k:06d}.tar" for k in range(3)]
    folder = scan_folder(Path(layouts["folder"]) / "train")
    shards = index_shards(train, warn=False)
    assert [(Path(p.split("::")[1]).stem, y) for p, y in shards.samples] == \
        [(Path(p).stem, y) for p, y in folder.samples]


def test_class_names_in_cls_map_onto_the_training_classes(tmp_path, layouts):
    from fixres.method.inputs import index_train_val
    val = scan_folder(Path(layouts["folder"]) / "val")
    write_shards(tmp_path, "train", scan_folder(Path(layouts["folder"]) / "train").samples, names=True)
    write_shards(tmp_path, "val", val.samples, names=True)
    splits = index_train_val(tmp_path, warn=False)
    assert splits.train.classes == CLASSES and not splits.one_folder
    assert [y for _, y in splits.val.samples] == [y for _, y in val.samples]


def test_class_numbers_keep_the_models_numbering_when_a_split_lacks_the_last_classes(tmp_path, layouts):
    from fixres.method.inputs import index_train_val
    train = [s for s in scan_folder(Path(layouts["folder"]) / "train").samples if s[1] < 2]  # no class 2
    val = scan_folder(Path(layouts["folder"]) / "val").samples
    write_shards(tmp_path, "train", train)
    write_shards(tmp_path, "val", val)
    splits = index_train_val(tmp_path, num_classes=4, warn=False)  # a model with 4 outputs
    assert splits.train.classes == ["0", "1", "2", "3"] == splits.val.classes
    assert [y for _, y in splits.val.samples] == [y for _, y in val]  # class 2 is the model's class 2
    with pytest.raises(UsageError, match="class 2 is outside the 2 classes of the class numbers"):
        index_train_val(tmp_path, num_classes=2, warn=False)
    assert index_shards(resolve_shards(tmp_path, "val"), warn=False).classes == ["0", "1", "2"]  # no model: as seen


def test_a_sample_without_its_class_is_left_out_and_named(tmp_path, capsys):
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        add_members(tar, [("a.jpg", b"x"), ("a.cls", b"0"), ("b.jpg", b"y")])
    index = index_shards(resolve_shards(tmp_path / "x.tar", "val"))
    assert len(index.samples) == 1 and index.skipped_folders == [(f"{tmp_path / 'x.tar'}::b", "no .cls member")]
    assert "left out" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--data", "nowhere-{0..2}.tar"], "shard not found"),
    (["--data", "DATA", "--image-column", "img"], "name columns of a Hugging Face dataset"),
    (["--data", "hf:HF", "--label-column", "nope"], "no column 'nope'"),
    (["--data", "hf:HF?colour=x"], "unknown setting 'colour'"),
    (["--data", "hf:MISSING"], "Hugging Face dataset folder not found"),
])
def test_bad_layouts_get_one_line(capsys, tmp_path, layouts, args, says):
    hf = _layout(layouts, "hf")[3:]
    args = [a.replace("DATA", layouts["folder"]).replace("HF", hf).replace("MISSING", str(tmp_path / "m"))
            for a in args]
    code, _, err = cli(capsys, "eval", *args, "--checkpoint", layouts["ckpt"], *MODEL, "--test-size", "32",
                       "--out", tmp_path / "o")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_named_columns_read_a_dataset_without_feature_types(capsys, tmp_path, layouts):
    datasets = pytest.importorskip("datasets")
    val = scan_folder(Path(layouts["folder"]) / "val")
    ds = datasets.Dataset.from_dict({"jpeg": [Path(p).read_bytes() for p, _ in val.samples],
                                     "kind": [CLASSES[y] for _, y in val.samples]})
    ds.save_to_disk(str(tmp_path / "plain"))
    code, _, err = cli(capsys, "eval", "--data", f"hf:{tmp_path / 'plain'}", "--checkpoint", layouts["ckpt"], *MODEL,
                       "--test-size", "32", "--out", tmp_path / "no-names")
    assert code == 2 and "--image-column" in err
    ours = _eval(capsys, {**layouts, "plain": f"hf:{tmp_path / 'plain'}"}, "plain", tmp_path / "o", "eval",
                 "--test-size", "40", "--image-column", "jpeg", "--label-column", "kind")
    folder = _eval(capsys, layouts, "folder", tmp_path / "f", "eval", "--test-size", "40")
    assert ours["rows"] == folder["rows"]


def test_analyze_reads_photo_sizes_from_shards(capsys, layouts):
    code, out, err = cli(capsys, "analyze", "--train-size", "32", "--data", layouts["shards"], "--json")
    assert code == 0, err
    assert json.loads(out)["monte_carlo"]["image_sizes_used"] == 3 * 4


def test_a_photo_changed_inside_a_shard_changes_the_runs_fingerprint(tmp_path, layouts):
    from fixres.job.fingerprint import index_fingerprint
    samples = scan_folder(Path(layouts["folder"]) / "val").samples
    write_shards(tmp_path, "val", samples)
    before = index_fingerprint(index_shards(resolve_shards(tmp_path, "val"), warn=False).samples)
    edited = tmp_path / "edited.jpg"
    edited.write_bytes(Path(samples[0][0]).read_bytes()[:-2] + b"\xff\xd9")  # same size, other bytes
    write_shards(tmp_path, "val", [(str(edited), samples[0][1])] + samples[1:])
    renamed = [(p.replace("edited", "img_000"), y) for p, y in
               index_shards(resolve_shards(tmp_path, "val"), warn=False).samples]
    assert index_fingerprint(renamed) != before


def test_a_hugging_face_dataset_given_in_python_scores_as_its_folder(layouts):
    datasets = pytest.importorskip("datasets")
    import fixres
    from fixres.io.checkpoint import load_state_dict
    root = Path(_layout(layouts, "hf")[len("hf:"):])
    given = datasets.load_from_disk(str(root))  # a DatasetDict: its validation split is evaluated
    model = fixres.load("fixres_tiny_resnet", num_classes=3, random_init=True)
    model.model.load_state_dict(load_state_dict(layouts["ckpt"]))
    ours = fixres.sweep(model, given, test_sizes=[32, 48], amp=False)
    folder = fixres.sweep(model, layouts["folder"], test_sizes=[32, 48], amp=False)
    assert [(r.test_size, r.correct, r.loss) for r in ours.rows] == \
        [(r.test_size, r.correct, r.loss) for r in folder.rows]
    assert len(ours.skipped) == len(folder.skipped) == 1  # the unreadable row is a counted skip, as its file


def test_val_count_refuses_a_missing_shard(capsys, tmp_path, layouts):
    two = os.path.join(layouts["shards"], "val-{000000..000001}.tar")  # the third shard left out
    code, _, err = cli(capsys, "eval", "--data", two, "--checkpoint", layouts["ckpt"], *MODEL, "--test-size", "32",
                       "--val-count", "13", "--out", tmp_path / "o")
    assert code == 2 and "--val-count 13" in err and "missing" in err, err
    assert _eval(capsys, layouts, "shards", tmp_path / "all", "eval", "--test-size", "32", "--val-count",
                 "13")["n_samples"] == 13
