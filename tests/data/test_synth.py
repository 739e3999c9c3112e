"""The embedded data set: reproducible bytes, ImageFolder layout, the paper's imaging model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fixres.data import synth
from fixres.data.folders import resolve_split, scan_folder
from fixres.data.images import load_rgb
from fixres.errors import UsageError

SMALL = dict(classes=3, train_per_class=2, val_per_class=1, short_side=(64, 96), workers=0, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synth.make_dataset(tmp_path / "a", seed=3, **SMALL)
    b = synth.make_dataset(tmp_path / "b", seed=3, **{**SMALL, "workers": 2})  # parallel: same bytes
    c = synth.make_dataset(tmp_path / "c", seed=4, **SMALL)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(fa) == 3 * (2 + 1)
    assert fa == fb
    assert fa.keys() == fc.keys() and all(fa[k] != fc[k] for k in fa)
    assert (tmp_path / "a" / synth.MANIFEST).read_bytes() == (tmp_path / "b" / synth.MANIFEST).read_bytes()
    assert a["counts"] == b["counts"] == {"train": 6, "val": 3} and not a["reused"] and not b["reused"]
    assert c["classes"] == a["classes"] == synth.class_names(3)


def test_layout_reads_as_imagefolder_with_real_photo_geometry(tmp_path):
    synth.make_dataset(tmp_path / "d", seed=0, **{**SMALL, "train_per_class": 6, "short_side": (80, 120)})
    train = scan_folder(resolve_split(tmp_path / "d", "train"))
    val = scan_folder(resolve_split(tmp_path / "d", "val"))
    assert train.classes == val.classes == sorted(synth.class_names(3))
    assert len(train) == 18 and len(val) == 3
    aspects = set()
    for path, _ in train.samples:
        img = load_rgb(path)
        w, h = img.size
        assert 80 <= min(w, h) <= 120
        aspects.add(min((abs(w / h - a), a) for a in synth.ASPECTS)[1])
        assert min(abs(w / h - a) for a in synth.ASPECTS) < 0.02
    assert len(aspects) >= 2  # several aspect ratios, as real photos


def test_reuse_refuse_and_overwrite(tmp_path):
    out = tmp_path / "d"
    synth.make_dataset(out, seed=0, **SMALL)
    again = synth.make_dataset(out, seed=0, **SMALL)
    assert again["reused"]
    with pytest.raises(UsageError, match="not empty"):
        synth.make_dataset(out, seed=1, **SMALL)
    other = synth.make_dataset(out, seed=1, overwrite=True, **SMALL)
    assert not other["reused"] and synth.read_manifest(out)["config"]["seed"] == 1
    with pytest.raises(UsageError):
        synth.make_dataset(tmp_path / "e", classes=1)
    with pytest.raises(UsageError):
        synth.make_dataset(tmp_path / "e", classes=synth.MAX_CLASSES + 1)


def test_classes_need_both_shape_and_texture():
    specs = synth.CLASS_SPECS[:10]
    assert len(set(specs)) == 10
    shapes = [s for s, _ in specs]
    textures = [t for _, t in specs]
    # Some classes share a shape (texture tells them apart) and every texture is shared (shape tells them apart).
    assert any(shapes.count(s) > 1 for s in shapes)
    assert all(textures.count(t) > 1 for t in textures)


def test_apparent_size_follows_r_equals_f_R_over_Z():
    """r = f R / Z with f = sqrt(H W): the object's fraction of the photo does not depend on its resolution."""
    cfg = synth.SynthConfig()
    fractions = {}
    for short in ((100, 110), (300, 320)):
        c = synth.SynthConfig(short_side=short)
        fr = []
        for i in range(40):
            rng = np.random.default_rng(i)
            _, g = synth.render_photo(rng, "disc", "stripes", c)
            f = math.sqrt(g["width"] * g["height"])
            expected = min(f * g["R"] / g["Z"], synth.MAX_FILL * min(g["width"], g["height"]))
            assert abs(g["r"] - expected) <= 1.0
            assert cfg.distance[0] <= g["Z"] <= cfg.distance[1]
            # Framed near the centre: within a few framing std of it.
            assert abs(g["cx"] / g["width"] - 0.5) < 5 * synth.FRAMING_STD
            fr.append(g["r_over_sqrt_hw"])
        fractions[short] = np.asarray(fr)
    small, large = fractions.values()
    # Same seeds, same R and Z draws: the fraction matches up to pixel rounding at the low resolution.
    assert np.allclose(small, large, atol=0.02)
    assert small.min() < 0.2 and small.max() > 0.4  # near and far objects


def test_object_is_drawn_where_the_geometry_says(tmp_path):
    """The photo differs from its empty background inside the object's box and not much outside it."""
    cfg = synth.SynthConfig()
    rng = np.random.default_rng(7)
    photo, g = synth.render_photo(rng, "square", "checker", cfg)
    arr = np.asarray(photo, dtype=np.float32)
    x0, y0 = int(g["cx"] - g["r"] / 2), int(g["cy"] - g["r"] / 2)
    box = arr[y0 + g["r"] // 4: y0 + 3 * g["r"] // 4, x0 + g["r"] // 4: x0 + 3 * g["r"] // 4]
    # The checker texture alternates two colours: high variance inside the object.
    assert box.std() > 30


def test_cli_make_dataset(tmp_path, capsys):
    from fixres.cli.app import main
    rc = main(["make-dataset", "--out", str(tmp_path / "d"), "--classes", "2", "--train-per-class", "1",
               "--val-per-class", "1", "--workers", "0", "-q", "--json"])
    assert rc == 0
    import json
    res = json.loads(capsys.readouterr().out)
    assert res["counts"] == {"train": 2, "val": 2} and res["config"]["classes"] == 2 and len(res["classes"]) == 2
    photos = sorted((tmp_path / "d").rglob("*.jpg"))
    assert len(photos) == 4
    assert {p.parent.name for p in photos} == set(res["classes"])
    assert {p.parent.parent.name for p in photos} == {"train", "val"}
    assert sum(res["photo_sizes"].values()) == 4


# --------------------------------------------------------------------------- --overwrite


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_overwrite_refuses_a_folder_that_is_not_a_data_set(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="not a fixres data set"):
        synth.make_dataset(out, seed=0, overwrite=True, **SMALL)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_the_current_directory_and_its_parents(tmp_path, monkeypatch):
    out = tmp_path / "d"
    synth.make_dataset(out, seed=0, **SMALL)
    before = _tree(out)
    (out / "train" / "sub").mkdir()
    for cwd in (out, out / "train" / "sub"):
        monkeypatch.chdir(cwd)
        with pytest.raises(UsageError, match="current directory or a folder above it"):
            synth.make_dataset("." if cwd == out else "../..", seed=1, overwrite=True, **SMALL)
    assert _tree(out) == before


def test_overwrite_killed_midway_leaves_the_old_data_set(tmp_path, monkeypatch):
    out = tmp_path / "d"
    synth.make_dataset(out, seed=0, **SMALL)
    before = {p: (out / p).read_bytes() for p in _tree(out)}
    real = synth._write_class
    calls = []

    def killed(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) while the new set is being drawn
        return real(job)

    monkeypatch.setattr(synth, "_write_class", killed)
    with pytest.raises(KeyboardInterrupt):
        synth.make_dataset(out, seed=1, overwrite=True, **SMALL)
    assert {p: (out / p).read_bytes() for p in _tree(out)} == before
    monkeypatch.setattr(synth, "_write_class", real)
    synth.make_dataset(out, seed=1, overwrite=True, **SMALL)
    assert synth.read_manifest(out)["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no partial or old copy left beside it


def test_cli_make_dataset_overwrite_dot_is_refused(tmp_path, capsys, monkeypatch):
    from helpers.cli import assert_one_line_error, cli
    monkeypatch.chdir(tmp_path)
    args = ["make-dataset", "--classes", "2", "--train-per-class", "1", "--val-per-class", "1", "--workers", "0",
            "-q", "--out", "."]
    assert cli(capsys, *args)[0] == 0
    before = _tree(tmp_path)
    code, out, err = cli(capsys, *args, "--seed", "5", "--overwrite")
    assert code == 2
    assert_one_line_error(err, "current directory")
    assert _tree(tmp_path) == before
