"""Bad and awkward image files: converted correctly, or skipped, counted and named.

The corpus (tests/helpers/corpus.py) holds every kind; each is checked on its own through ``load_rgb``, then
mixed into a small data set and pushed through the data path (dataset + collate + loader) and through
``fixres eval`` and ``fixres analyze --data``: the skipped files are counted and named, and the numbers
on the good files equal a run without the bad ones.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint, write_image_folder
from helpers.cli import assert_one_line_error, cli
from helpers.corpus import bad_entries, good_entries, png_claiming_size, write_corpus
from PIL import Image

from fixres.config import DataConfig
from fixres.data import transforms as T
from fixres.data.folders import scan_folder
from fixres.data.images import MAX_ASPECT_RATIO, BadImage, load_rgb, probe_size
from fixres.data.loaders import ImageDataset, Skipped, collate, make_loader
from fixres.errors import UsageError

CFG = DataConfig(train_size=32)
TEST_SIZE = 32



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder)


def _entry_ids():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return [e.name for e in write_corpus(d)]


CORPUS_NAMES = _entry_ids()


def test_corpus_covers_every_kind(corpus):
    _, entries = corpus
    kinds = " | ".join(e.kind for e in entries).lower()
    for kind in ("zero-byte", "truncated", "non-image", "16-bit", "palette png", "transparent", "rgba", "cmyk",
                 "grayscale jpeg", "exif", "1x1", "animated gif", "100000x100000"):
        assert kind in kinds, kind
    assert len(bad_entries(entries)) >= 6 and len(good_entries(entries)) >= 12


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_each_file_is_converted_or_skipped_with_reason(corpus, name):
    folder, entries = corpus
    entry = next(e for e in entries if e.name == name)
    if entry.ok:
        img = load_rgb(folder / name)
        assert img.mode == "RGB"
        assert img.size == entry.size, f"{entry.kind}: size {img.size}, expected {entry.size}"
        for (x, y), colour in entry.pixels.items():
            got = img.getpixel((x, y))
            assert max(abs(a - b) for a, b in zip(got, colour)) <= entry.tolerance, \
                f"{entry.kind}: pixel {(x, y)} is {got}, expected {colour}"
        # Header-only probing (analyze --data) agrees with the decoded, upright size.
        assert probe_size(folder / name) == (entry.size, None)
    else:
        with pytest.raises(BadImage) as info:
            load_rgb(folder / name)
        reason = str(info.value)
        assert reason and "\n" not in reason and entry.reason in reason


def test_exif_orientation_applied():
    """A landscape-stored photo with orientation 6 loads as portrait, red (stored left) on top."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        write_corpus(d)
        raw = Image.open(Path(d) / "exif_rotated.jpg")
        assert raw.size == (60, 40)  # stored landscape
        img = load_rgb(Path(d) / "exif_rotated.jpg")
        assert img.size == (40, 60)
        top, bottom = np.asarray(img)[5, 20], np.asarray(img)[55, 20]
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_bomb_guard_does_not_allocate(tmp_path):
    """The 100000x100000 header is refused from the header: no 30 GB allocation, and fast."""
    import time
    p = tmp_path / "bomb.png"
    p.write_bytes(png_claiming_size(100_000, 100_000))
    assert p.stat().st_size < 200
    t0 = time.perf_counter()
    with pytest.raises(BadImage, match="too large"):
        load_rgb(p)
    assert time.perf_counter() - t0 < 1.0
    assert probe_size(p)[0] is None and "too large" in probe_size(p)[1]


def test_extreme_aspect_ratio_is_skipped(tmp_path):
    """A 1 x 2000 strip would need a huge resize at test time; refused with its size in the reason."""
    p = tmp_path / "strip.png"
    Image.new("RGB", (1, MAX_ASPECT_RATIO * 40), (0, 0, 0)).save(p)
    with pytest.raises(BadImage, match="aspect"):
        load_rgb(p)
    ok = tmp_path / "wide.png"
    Image.new("RGB", (MAX_ASPECT_RATIO, 1), (0, 0, 0)).save(ok)
    assert load_rgb(ok).size == (MAX_ASPECT_RATIO, 1)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BadImage, match="cannot read"):
        load_rgb(tmp_path / "gone.jpg")
    d = tmp_path / "folder.jpg"
    d.mkdir()
    with pytest.raises(BadImage):
        load_rgb(d)


def test_random_corruption_never_crashes(corpus, tmp_path):
    """Flipped bytes and cut-off files of every format: an RGB image or BadImage, nothing else."""
    folder, entries = corpus
    sources = [folder / e.name for e in entries if (folder / e.name).stat().st_size > 0]
    rng = random.Random(0)
    outcomes = {"ok": 0, "skipped": 0}
    for i in range(300):
        src = rng.choice(sources)
        data = bytearray(src.read_bytes())
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data) + 1)]
        p = tmp_path / f"fuzz{src.suffix}"
        p.write_bytes(bytes(data))
        try:
            img = load_rgb(p)
        except BadImage as exc:
            assert str(exc)
            outcomes["skipped"] += 1
        else:
            assert img.mode == "RGB" and min(img.size) >= 1
            outcomes["ok"] += 1
        probe_size(p)  # never raises either
    assert outcomes["ok"] > 0 and outcomes["skipped"] > 0


@pytest.mark.parametrize("w,h", [(1, 1), (1, 3), (2, 1)])
def test_tiny_images_are_upsampled_to_test_size(tmp_path, w, h):
    p = tmp_path / "tiny.png"
    Image.new("RGB", (w, h), (10, 200, 30)).save(p)
    x = T.test_transform(T.geometry_for(TEST_SIZE, CFG, 0.875), CFG)(load_rgb(p))
    assert x.shape == (3, TEST_SIZE, TEST_SIZE)
    t = T.train_transform(train_size=24, cfg=CFG)(load_rgb(p))
    assert t.shape == (3, 24, 24)


# --------------------------------------------------------------------------- the data path


@pytest.fixture(scope="module")
def mixed_folders(tmp_path_factory):
    """clean/: 3 classes x 3 good JPEGs; mixed/: the same plus the whole corpus spread over the classes."""
    base = tmp_path_factory.mktemp("mixed")
    clean = write_image_folder(base / "clean", classes=3, per_class=3, seed=5)
    mixed = base / "mixed"
    shutil.copytree(clean, mixed)
    entries = write_corpus(base / "corpus")
    for i, e in enumerate(entries):
        # "zz_" sorts the corpus after the good files of each class
        shutil.copy(base / "corpus" / e.name, mixed / f"class_{i % 3}" / f"zz_{e.name}")
    return clean, mixed, entries


def _run_loader(root, batch_size=4, workers=0):
    index = scan_folder(root)
    ds = ImageDataset(index.samples, T.test_transform(T.geometry_for(TEST_SIZE, CFG, 0.875), CFG))
    loader = make_loader(ds, batch_size=batch_size, workers=workers)
    outputs, skipped = {}, []
    for batch in loader:
        skipped.extend(batch.skipped)
        if batch.inputs is None:
            continue
        assert batch.inputs.shape[1:] == (3, TEST_SIZE, TEST_SIZE)
        for x, y, i in zip(batch.inputs, batch.labels, batch.indices):
            path, label = index.samples[int(i)]
            assert int(y) == label
            outputs[Path(path).name, label] = x
    return index, outputs, skipped


def test_data_path_skips_and_counts(mixed_folders):
    clean, mixed, entries = mixed_folders
    index_clean, out_clean, skipped_clean = _run_loader(clean)
    index_mixed, out_mixed, skipped = _run_loader(mixed)
    bad = bad_entries(entries)
    assert skipped_clean == []
    assert len(index_mixed) == len(index_clean) + len(entries)
    assert len(skipped) == len(bad)
    assert len(out_mixed) == len(index_clean) + len(good_entries(entries))
    assert sorted(Path(s.path).name for s in skipped) == sorted(f"zz_{e.name}" for e in bad)
    assert all(isinstance(s, Skipped) and s.reason for s in skipped)
    assert all(set(s.to_dict()) == {"path", "reason"} for s in skipped)
    # The good files give exactly the tensors of a run without the bad ones.
    for key, x in out_clean.items():
        assert torch.equal(out_mixed[key], x)


def test_data_path_with_worker_processes(mixed_folders):
    """Skips travel through DataLoader worker processes too (the default for real runs)."""
    _, mixed, entries = mixed_folders
    _, out0, skipped0 = _run_loader(mixed)
    _, out2, skipped2 = _run_loader(mixed, workers=2)
    assert sorted(s.path for s in skipped2) == sorted(s.path for s in skipped0)
    assert len(skipped2) == len(bad_entries(entries))
    assert out2.keys() == out0.keys() and all(torch.equal(out2[k], out0[k]) for k in out0)


def test_collate_all_skipped_batch():
    batch = collate([Skipped(0, "a.jpg", "empty file"), Skipped(1, "b.jpg", "not an image")])
    assert batch.inputs is None and len(batch) == 0 and len(batch.skipped) == 2


def test_collate_multiview():
    x16, x24 = torch.zeros(3, 16, 16), torch.zeros(3, 24, 24)
    batch = collate([((x16, x24), 1, 0), Skipped(1, "b.jpg", "empty file"), ((x16, x24), 2, 2)])
    assert [t.shape for t in batch.inputs] == [(2, 3, 16, 16), (2, 3, 24, 24)]
    assert batch.labels.tolist() == [1, 2] and batch.indices.tolist() == [0, 2] and len(batch.skipped) == 1


def test_empty_class_folder_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    (root / "class_9_empty").mkdir()
    with pytest.raises(UsageError, match="empty class folder.*class_9_empty"):
        scan_folder(root)


def test_no_image_files_is_an_error(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "notes.txt").write_text("hi")
    with pytest.raises(UsageError, match="no image files"):
        scan_folder(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(UsageError, match="no class folders"):
        scan_folder(tmp_path / "e")


def _only_bad_folder(root: Path, classes: int = 1) -> Path:
    """``classes`` class folders holding nothing but unusable files."""
    for c in range(classes):
        entries = write_corpus(root / ("cls" if classes == 1 else f"class_{c}"), include_good=False)
        assert entries and all(not e.ok for e in entries)
    return root


def test_symlink_loop_and_hidden_files_are_not_samples(tmp_path):
    """A symlink loop must not list the same photo again and again; hidden files and folders are not data."""
    import os
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    os.symlink(root / "class_0", root / "class_0" / "again")  # loop
    (root / "class_1" / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / "class_1" / "img_000.jpg", root / "class_1" / ".ipynb_checkpoints" / "img_000.jpg")
    (root / "class_1" / "._img_000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    linked = tmp_path / "elsewhere"
    write_image_folder(linked, classes=1, per_class=1, seed=3)
    os.symlink(linked / "class_0", root / "class_1" / "linked")  # a real (non-loop) link is followed
    index = scan_folder(root)
    names = sorted(os.path.relpath(p, root) for p, _ in index.samples)
    assert names == ["class_0/img_000.jpg", "class_0/img_001.jpg", "class_1/img_000.jpg", "class_1/img_001.jpg",
                     "class_1/linked/img_000.jpg"]


def test_cli_empty_class_folder_exit_2(capsys, tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    (root / "empty_class").mkdir()
    code, out, err = cli(capsys, "analyze", "--data", root)
    assert code == 2
    assert_one_line_error(err, "empty class folder", "empty_class")


def test_cli_analyze_no_readable_image_exit_2(capsys, tmp_path):
    root = _only_bad_folder(tmp_path / "bad")
    # analyze reads headers only; a truncated file still has a size, so leave those out here
    for f in (root / "cls").iterdir():
        if probe_size(f)[0] is not None:
            f.unlink()
    assert len(list((root / "cls").iterdir())) >= 4
    code, out, err = cli(capsys, "analyze", "--data", root)
    assert code == 2
    assert_one_line_error(err, "no readable image")


def test_cli_analyze_names_skipped(capsys, mixed_folders):
    clean, mixed, entries = mixed_folders
    code, out, err = cli(capsys, "analyze", "--data", mixed, "--json", "--samples", "2000")
    assert code == 0
    res = json.loads(out)
    n_clean = len(scan_folder(clean))
    skipped_names = sorted(Path(s["path"]).name for s in res["skipped"])
    # analyze reads headers only: a truncated file still has a readable size
    corpus_dir = mixed.parent / "corpus"
    header_bad = sorted(f"zz_{e.name}" for e in entries if probe_size(corpus_dir / e.name)[0] is None)
    assert skipped_names == header_bad
    assert res["n_images"] == n_clean + len(entries) - len(header_bad)
    assert all(s["reason"] for s in res["skipped"])


# --------------------------------------------------------------------------- fixres eval


@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors")


def _eval(capsys, data, ck, out):
    return cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", data,
               "--test-size", TEST_SIZE, "--workers", "0", "--batch-size", "4", "--json", "--out", out, "-q")


def test_eval_skips_bad_files_and_matches_clean_run(capsys, mixed_folders, tiny_ck, tmp_path):
    """eval over good + bad files == eval over the good files alone; the bad ones are named in `skipped`."""
    clean, mixed, entries = mixed_folders
    code, out, err = _eval(capsys, mixed, tiny_ck, tmp_path / "mixed")
    assert code == 0, err
    res_mixed = json.loads(out)
    bad = bad_entries(entries)
    assert sorted(Path(s["path"]).name for s in res_mixed["skipped"]) == sorted(f"zz_{e.name}" for e in bad)
    assert all(s["reason"] and "\n" not in s["reason"] for s in res_mixed["skipped"])
    assert res_mixed["n_images"] == len(scan_folder(clean)) + len(good_entries(entries))
    good_only = tmp_path / "good_only"
    shutil.copytree(mixed, good_only)
    for e in bad:
        for f in good_only.glob(f"*/zz_{e.name}"):
            f.unlink()
    code, out, err = _eval(capsys, good_only, tiny_ck, tmp_path / "good")
    assert code == 0, err
    res_good = json.loads(out)
    assert res_good["skipped"] == []
    assert res_good["n_images"] == res_mixed["n_images"]
    row_m, row_g = res_mixed["rows"][0], res_good["rows"][0]
    assert row_m["n"] == row_g["n"] == res_good["n_images"]
    assert row_m["top1"] == pytest.approx(row_g["top1"], abs=1e-9)
    assert row_m["top5"] == pytest.approx(row_g["top5"], abs=1e-9)
    assert row_m["loss"] == pytest.approx(row_g["loss"], rel=1e-5)
    # The written eval.json names the skipped files too.
    written = json.loads((tmp_path / "mixed" / "eval.json").read_text())
    assert len(written["skipped"]) == len(bad)


@pytest.mark.parametrize("command,extra", [
    ("eval", ["--test-size", TEST_SIZE]),
    ("train", ["--train-size", TEST_SIZE, "--epochs", "1"]),
    ("finetune", ["--test-size", TEST_SIZE, "--epochs", "1"]),
])
def test_no_readable_image_exit_2(capsys, tiny_ck, tmp_path, command, extra):
    """Three class folders of unusable files only: one line naming the problem, exit 2, no result file."""
    if command == "finetune":  # it fits on train/ and reports val/: both unusable
        root = tmp_path / "bad"
        _only_bad_folder(root / "train", classes=3)
        _only_bad_folder(root / "val", classes=3)
    else:
        root = _only_bad_folder(tmp_path / "bad", classes=3)
    code, out, err = cli(capsys, command, "--model", "fixres_tiny_resnet", "--data", root, "--workers", "0",
                         "--out", tmp_path / "o", "-q", *extra,
                         *(["--checkpoint", tiny_ck] if command != "train" else []))
    assert code == 2, err
    assert_one_line_error(err, "no image could be read", "skipped")
    assert not (tmp_path / "o" / "eval.json").exists() and not (tmp_path / "o" / "model.safetensors").exists()


def test_eval_empty_class_folder_exit_2(capsys, tiny_ck, tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=2)
    (root / "empty_class").mkdir()
    code, out, err = _eval(capsys, root, tiny_ck, tmp_path / "o")
    assert code == 2, err
    assert_one_line_error(err, "empty_class")


# --------------------------------------------------------------------------- every other data command

#: Each command on the mixed folder (good + bad files): it must finish and name the bad files.
DATA_COMMANDS = {
    "sweep": ["--test-sizes", "32", "--no-plot", "--no-per-class"],
    "finetune": ["--test-size", "32", "--epochs", "1", "--no-export"],
    "train": ["--train-size", "32", "--epochs", "1", "--repeats", "1", "--val-sizes", "32"],
    "stats": ["--sizes", "32"],
    "adapt": ["--method", "bn-recalibrate", "--test-size", "32", "--no-eval"],
}


def _skipped_names(result) -> set[str]:
    """File names in every `skipped` list anywhere in a result."""
    names = set()
    if isinstance(result, dict):
        for k, v in result.items():
            if k == "skipped" and isinstance(v, list):
                names |= {Path(s["path"]).name for s in v if isinstance(s, dict) and "path" in s}
            else:
                names |= _skipped_names(v)
    elif isinstance(result, list):
        for v in result:
            names |= _skipped_names(v)
    return names


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
def test_data_commands_skip_and_name_bad_files(capsys, mixed_folders, tiny_ck, tmp_path, command):
    clean, mixed, entries = mixed_folders
    data = mixed
    if command in ("finetune", "adapt"):  # they fit on train/ and report val/: the bad files are in both
        data = tmp_path / "split"
        shutil.copytree(mixed, data / "train")
        shutil.copytree(mixed, data / "val")
    argv = [command, "--model", "fixres_tiny_resnet", "--data", data, "--workers", "0", "--batch-size", "4",
            "--out", tmp_path / "out", "--json", "-q", *DATA_COMMANDS[command]]
    if command != "train":
        argv += ["--checkpoint", tiny_ck]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "Traceback" not in err
    result = json.loads(out)
    assert _skipped_names(result) == {f"zz_{e.name}" for e in bad_entries(entries)}


def test_eval_non_utf8_file_and_class_names(capsys, tiny_ck, tmp_path):
    """Names that are not valid UTF-8 (old archives) are reported and written, not a crash at the end."""
    import os
    root = write_image_folder(tmp_path / "d", classes=3, per_class=2)
    odd_class = os.fsdecode(bytes(tmp_path / "d") + b"/class_\xff")
    os.rename(root / "class_2", odd_class)
    bad_name = os.path.join(odd_class, os.fsdecode(b"bad_\xfe.jpg"))
    with open(bad_name, "wb"):
        pass
    code, out, err = _eval(capsys, root, tiny_ck, tmp_path / "o")
    assert code == 0, err
    res = json.loads(out)
    assert [s["path"] for s in res["skipped"]] == [bad_name]
    written = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert written["n_images"] == 6 and len(written["skipped"]) == 1
    assert b"class_\xff" in (tmp_path / "o" / "per_class.csv").read_bytes()
    code, out, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", tiny_ck, "--data", root,
                         "--test-size", TEST_SIZE, "--workers", "0", "--out", tmp_path / "o2")
    assert code == 0, err  # the human summary names the odd file too
    skipped_line = [ln for ln in out.splitlines() if ln.startswith("skipped 1 unreadable file")]
    shown = bad_name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")  # printable, no crash
    assert len(skipped_line) == 1 and shown in skipped_line[0] and "empty file" in skipped_line[0], out
    assert "on 6 images" in out and "(1 skipped)" in out


@pytest.mark.parametrize("content,phrase", [
    (b"[]", "empty"),
    (b"{}", "empty"),
    (b"", "empty"),
    (b'["a", "b", "a"]', "more than once"),
    (b'{"a": 0, "b": 0}', "unique"),
    (b'{"a": "zero"}', "unique"),
    (b'"just a string"', "expected a JSON list"),
    (b"\xff\xfe not utf-8", "UTF-8"),
])
def test_bad_class_maps(tmp_path, content, phrase):
    from fixres.data.folders import read_class_map
    p = tmp_path / "classes.json"
    p.write_bytes(content)
    with pytest.raises(UsageError, match=phrase):
        read_class_map(p)


def test_class_maps_read(tmp_path):
    from fixres.data.folders import read_class_map
    (tmp_path / "a.json").write_text('{"cat": 2, "dog": 0}')
    assert read_class_map(tmp_path / "a.json") == ["dog", "<unused 1>", "cat"]
    (tmp_path / "b.txt").write_text("# classes\ndog\n\ncat\n")
    assert read_class_map(tmp_path / "b.txt") == ["dog", "cat"]


class _Niceness(torch.utils.data.Dataset):
    """Each item is the priority (niceness) of the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        import os
        return torch.zeros(1), os.nice(0), i


def test_loader_workers_run_below_the_process_they_feed():
    import os

    from fixres.data.loaders import WORKER_NICENESS
    ours = os.nice(0)
    in_workers = make_loader(_Niceness(), batch_size=2, workers=1)
    in_process = make_loader(_Niceness(), batch_size=2, workers=0)
    assert next(iter(in_workers)).labels.tolist() == [min(19, ours + WORKER_NICENESS)] * 2
    assert next(iter(in_process)).labels.tolist() == [ours] * 2
