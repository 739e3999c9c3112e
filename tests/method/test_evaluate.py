"""Evaluation: one-pass multi-view evaluation equals a naive per-size loop, fold std, skips, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image_folder

from fixres.data.folders import scan_folder
from fixres.data.images import load_rgb
from fixres.data.transforms import geometry_for, ten_crop_transform
from fixres.data.transforms import test_transform as center_crop_transform
from fixres.errors import UsageError
from fixres.method.evaluate import _scores, evaluate, fold_std
from fixres.runtime.engine import Precision

FP32 = Precision(False, None, False)




def _varied(tiny_model):
    """The tiny model with a random head bias, so its predictions differ between images and sizes."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        tiny_model.model.fc.bias.copy_(torch.randn(tiny_model.model.fc.bias.shape, generator=g) * 0.05)
        tiny_model.model.fc.weight.mul_(20.0)
    return tiny_model


def _naive_logp(model, samples, transforms) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of the softmax averaged over ``transforms`` (and over crops), fp32, one decode per view: the
    obvious reference, written independently of ``evaluate``."""
    model.eval()
    probs = []
    with torch.no_grad():
        for t in transforms:
            xs = [t(load_rgb(path)) for path, _ in samples]
            x = torch.stack(xs)
            crops = x.shape[1] if x.dim() == 5 else 1
            p = torch.softmax(model(x.reshape(-1, *x.shape[-3:])), 1).reshape(len(samples), crops, -1).mean(1)
            probs.append(p)
    return torch.stack(probs).mean(0).log(), torch.tensor([label for _, label in samples])


def _naive_numbers(logp, labels):
    top1 = logp.argmax(1) == labels
    top5 = (logp > logp.gather(1, labels[:, None])).sum(1) < 5
    loss = -logp.gather(1, labels[:, None])[:, 0]
    return int(top1.sum()), int(top5.sum()), float(loss.double().mean()), top1.numpy()


def test_fold_std_matches_its_definition():
    rng = np.random.default_rng(0)
    correct = rng.random(37) < 0.7
    folds = 10
    accs = []
    for k in range(folds):  # section 5: accuracy on 9 folds, leaving fold k out
        keep = [i for i in range(len(correct)) if i % folds != k]
        accs.append(np.mean(correct[keep]))
    assert fold_std(correct, folds) == pytest.approx(np.std(accs) * 100, abs=1e-12)
    # one error among ten images: leave-out accuracies are 1 (once) and 8/9 (nine times)
    assert fold_std([1] * 9 + [0], 10) == pytest.approx(np.std([1.0] + [8 / 9] * 9) * 100)
    assert fold_std(np.ones(50, bool)) == 0.0
    assert fold_std([True]) == 0.0
    with pytest.raises(UsageError):
        fold_std([True, False], folds=1)


def test_scores_break_ties_like_argmax_and_refuse_nan():
    nan = float("nan")
    logp = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                         [3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                         [3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                         [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],
                         [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                         [nan, nan, nan, nan, nan, nan, nan],
                         [0.0, 5.0, nan, 0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 4, 3, 0, 1])
    top1, top5, loss = _scores(logp, labels, 5)
    # a tie goes to the lower class index, as argmax decides: label 1 tied with 0 is wrong, label 0 right
    assert top1.tolist() == [False, False, True, False, False, False, False]
    assert top1.tolist() == (logp.argmax(1) == labels).tolist()[:5] + [False, False]
    # 5 classes above: outside the top 5; 4 above: inside; all equal, label 3: three "above" it
    assert top5.tolist() == [False, True, True, True, True, False, False]
    assert loss.tolist()[:5] == [-1.0, -3.0, -3.0, -5.0, -1.0]


def test_one_pass_sweep_equals_naive_per_size_loops(image_folder, tiny_model):
    bundle = _varied(tiny_model)
    index = scan_folder(image_folder)
    cfg = bundle.data_config
    sizes, ratios = [32, 48], [0.875, 1.0]
    res = evaluate(bundle.model, index, cfg, test_sizes=sizes, crop_ratios=ratios, batch_size=5, workers=0,
                   precision=FP32, progress=False, num_classes=3)
    assert [(r.test_size, r.crop_ratio) for r in res.rows] == [(s, c) for s in sizes for c in ratios]
    assert res.n_images == 12 and res.skipped == ()
    tops = set()
    for row in res.rows:
        t = center_crop_transform(geometry_for(row.test_size, cfg, row.crop_ratio), cfg)
        c1, c5, loss, correct = _naive_numbers(*_naive_logp(bundle.model, index.samples, [t]))
        assert (row.correct, row.correct5, row.n) == (c1, c5, 12)
        assert row.top1 == pytest.approx(100 * c1 / 12)
        assert row.loss == pytest.approx(loss, rel=1e-5)
        assert row.top1_std == pytest.approx(fold_std(correct))
        tops.add(row.correct)
    assert len(tops) > 1 or 0 < next(iter(tops)) < 12, "the model should not be trivially right or wrong"
    # per-class accuracies weighted by class counts give back top-1
    pc = res.per_class
    assert pc.classes == ("class_0", "class_1", "class_2") and pc.n == (4, 4, 4)
    for row in res.rows:
        per = pc.top1[f"{row.test_size}@{row.crop_ratio:g}"]
        assert sum(a * n for a, n in zip(per, pc.n)) / 12 == pytest.approx(row.top1)


def test_each_image_is_decoded_once_for_all_sizes(image_folder, tiny_model, monkeypatch):
    """Photos this small need no JPEG reduction at any of these sizes: one decode serves them all
    (larger photos: one decode per distinct reduction, tests/data/test_reduced_decode.py)."""
    import fixres.data.loaders
    calls = []

    def counting(path, **kw):  # kw: the reduced-decode plan (data.ImageDataset passes need=)
        calls.append(path)
        return load_rgb(path, **kw)

    monkeypatch.setattr(fixres.data.loaders, "load_rgb", counting)
    res = evaluate(tiny_model.model, scan_folder(image_folder), tiny_model.data_config,
                   test_sizes=[32, 40, 48, 64], crop_ratios=[0.875, 1.0], workers=0, progress=False)
    assert len(res.rows) == 8
    assert sorted(calls) == sorted(p for p, _ in scan_folder(image_folder).samples)


def test_ensemble_and_ten_crop_match_naive(image_folder, tiny_model):
    bundle = _varied(tiny_model)
    index = scan_folder(image_folder)
    cfg = bundle.data_config
    res = evaluate(bundle.model, index, cfg, test_sizes=[32], ensembles=[(32, 48)], batch_size=4, workers=0,
                   precision=FP32, progress=False)
    # the ensemble's member 48 is evaluated too, though not asked for
    assert [r.test_size for r in res.rows] == [32, 48]
    (ens,) = res.ensembles
    assert ens.test_sizes == (32, 48)
    members = [center_crop_transform(geometry_for(s, cfg, cfg.crop_ratio), cfg) for s in (32, 48)]
    c1, c5, loss, _ = _naive_numbers(*_naive_logp(bundle.model, index.samples, members))
    assert (ens.correct, ens.correct5) == (c1, c5)
    assert ens.loss == pytest.approx(loss, rel=1e-5)

    res10 = evaluate(bundle.model, index, cfg, test_sizes=[32], ten_crop=True, batch_size=3, workers=0,
                     precision=FP32, progress=False)
    t10 = ten_crop_transform(geometry_for(32, cfg, cfg.crop_ratio), cfg)
    c1, _, loss, _ = _naive_numbers(*_naive_logp(bundle.model, index.samples, [t10]))
    assert res10.rows[0].ten_crop is True
    assert res10.rows[0].correct == c1
    assert res10.rows[0].loss == pytest.approx(loss, rel=1e-5)


def test_unreadable_files_are_counted_not_fatal(tmp_path, tiny_model):
    root = write_image_folder(tmp_path / "d")
    clean = evaluate(tiny_model.model, scan_folder(root), tiny_model.data_config, test_sizes=[32], workers=0,
                     precision=FP32, progress=False)
    (root / "class_1" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "class_2" / "zz_empty.png").write_bytes(b"")
    res = evaluate(tiny_model.model, scan_folder(root), tiny_model.data_config, test_sizes=[32], workers=0,
                   precision=FP32, progress=False, batch_size=5)
    assert res.n_images == 12 and res.n_samples == 14
    assert [Path(s.path).name for s in res.skipped] == ["zz_broken.jpg", "zz_empty.png"]
    assert "empty" in res.skipped[1].reason
    assert res.rows[0].correct == clean.rows[0].correct
    assert res.rows[0].loss == pytest.approx(clean.rows[0].loss, rel=1e-6)


def test_class_count_mismatch_names_the_flags(image_folder, tiny_model):
    index = scan_folder(image_folder)
    with pytest.raises(UsageError, match=r"--num-classes.*--class-map"):
        evaluate(tiny_model.model, index, tiny_model.data_config, test_sizes=[32], workers=0, num_classes=5,
                 progress=False)
    bad = [(p, 7) for p, _ in index.samples]
    with pytest.raises(UsageError, match="model outputs 3"):
        evaluate(tiny_model.model, bad, tiny_model.data_config, test_sizes=[32], workers=0, progress=False)
    with pytest.raises(UsageError, match="two different"):
        evaluate(tiny_model.model, index, tiny_model.data_config, test_sizes=[32], ensembles=[(32, 32)],
                 workers=0, progress=False)


# --------------------------------------------------------------------------- CLI

def _cli(argv, capsys):
    from fixres.cli.app import main
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sweep_writes_json_csv_png_and_marks_recommended_size(image_folder, tmp_path, capsys):
    from fixres.choosing.best import best_size
    from fixres.method.analysis import recommend_test_size
    out = tmp_path / "sweep"
    torch.manual_seed(0)
    code, stdout, stderr = _cli(["sweep", "--data", str(image_folder), "--model", "fixres_tiny_resnet", "--random-init",
                                 "--num-classes", "3", "--test-sizes", "32,40,64", "--ensemble", "32,64",
                                 "--train-size", "32", "--workers", "0", "--out", str(out), "--json", "-q"], capsys)
    assert code == 0, stderr
    res = json.loads(stdout)
    assert [r["test_size"] for r in res["rows"]] == [32, 40, 64]
    assert res["ensembles"][0]["test_sizes"] == [32, 64]
    assert res["train_size"] == 32
    assert res["recommended_test_size"] == recommend_test_size(train_size=32, crop_ratio=0.875)["test_size"]
    assert (out / "sweep.json").is_file() and (out / "per_class.csv").is_file()
    _assert_png(out / "accuracy_vs_test_size.png")
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("test_size,crop_ratio") and len(lines) == 1 + 3 + 1
    # the numbers are the library's for the same model (the CLI is a thin layer), in the file as on stdout
    ref = _library_numbers(image_folder, train_size=32, test_sizes=[32, 40, 64], ensembles=[(32, 64)])
    saved = json.loads((out / "sweep.json").read_text())
    for got in (res, saved):
        assert [_numbers(r) for r in got["rows"] + got["ensembles"]] == \
            [_numbers(r) for r in ref["rows"] + ref["ensembles"]]
    assert res["best"]["test_size"] == best_size(ref["rows"], train_size=32)


def _assert_png(path, min_side: int = 100):
    """A real, decodable PNG of a plausible size (not just the magic bytes)."""
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        im.load()


def _library_numbers(folder, *, train_size, **kw) -> dict:
    """``evaluate`` on the model the CLI builds for ``--model fixres_tiny_resnet --random-init`` (same seed), as the
    JSON the CLI writes."""
    from fixres.models.loading import load_model
    torch.manual_seed(0)
    bundle = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=train_size)
    return evaluate(bundle.model, scan_folder(folder), bundle.data_config, workers=0, progress=False, **kw).to_json()


def _numbers(row) -> tuple:
    return (row["correct"], row["correct5"], row["n"], row["top1_std"], round(row["loss"], 5), round(row["ece"], 5))


def test_cli_eval_defaults_to_train_size_and_warns_on_stride(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    code, stdout, stderr = _cli(["eval", "--data", str(image_folder), "--model", "fixres_tiny_resnet", "--random-init",
                                 "--num-classes", "3", "--train-size", "40", "--workers", "0",
                                 "--out", str(tmp_path / "e")], capsys)
    assert code == 0, stderr
    assert "top-1" in stdout and "40" in stdout
    warnings = [line for line in stderr.splitlines() if "not a multiple of the network stride" in line]
    assert len(warnings) == 1 and "40" in warnings[0]
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [r["test_size"] for r in res["rows"]] == [40] and res["n_images"] == 12
    ref = _library_numbers(image_folder, train_size=40, test_sizes=[40])
    assert _numbers(res["rows"][0]) == _numbers(ref["rows"][0])
    assert f"{ref['rows'][0]['top1']:.2f}" in stdout


def test_cli_class_mismatch_is_one_line_usage_error(image_folder, tmp_path, capsys):
    code, stdout, stderr = _cli(["eval", "--data", str(image_folder), "--model", "fixres_tiny_resnet", "--random-init",
                                 "--test-size", "32", "--workers", "0", "--out", str(tmp_path / "e")], capsys)
    assert code == 2
    err = [line for line in stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "--num-classes 3" in err[0] and "Traceback" not in stderr


class _Overflowing(torch.nn.Module):
    """Activations of ~1e6: finite in fp32, infinite in fp16."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.fc = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.fill_(1e5)
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]) * 1e-6)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_fp16_overflow_falls_back_to_fp32(image_folder, tiny_model):
    from fixres.runtime.engine import inference_precision
    assert inference_precision(torch.device("cpu"), amp=False) == FP32
    index = scan_folder(image_folder)
    fp16 = Precision(True, torch.float16, True)
    model = _Overflowing()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(model(torch.ones(1, 3, 8, 8))).all()  # the premise: fp16 overflows
    kw = dict(test_sizes=[32], batch_size=5, workers=0, progress=False)
    res16 = evaluate(model, index, tiny_model.data_config, precision=fp16, **kw)
    res32 = evaluate(model, index, tiny_model.data_config, precision=FP32, **kw)
    assert res16.fp32_fallback_batches == 3 and res32.fp32_fallback_batches == 0
    assert res16.rows[0].correct == res32.rows[0].correct
    assert res16.rows[0].loss == pytest.approx(res32.rows[0].loss, rel=1e-6)


def test_fixed_input_size_model_is_evaluated_at_every_size_in_one_pass(image_folder, tiny_model):
    """A timm ViT built for one input size (no dynamic_img_size) runs each view through a copy moved to
    that size by timm's own set_input_size; the numbers are those of a copy moved there by hand, and the
    caller's model still runs at its own size only."""
    import copy

    import timm

    from fixres.models.loading import fit_input_size
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                            num_classes=3)
    pos_embed = vit.pos_embed.detach().clone()
    index = scan_folder(image_folder)
    cfg = tiny_model.data_config
    kw = dict(workers=0, progress=False, precision=FP32, batch_size=5)
    res = evaluate(vit, index, cfg, test_sizes=[32, 48], **kw)
    moved = copy.deepcopy(vit)
    assert fit_input_size(moved, 48) == {"img_size": [48, 48]}
    alone = evaluate(moved, index, cfg, test_sizes=[48], **kw)
    assert (res.rows[1].correct, res.rows[1].loss) == (alone.rows[0].correct,
                                                     pytest.approx(alone.rows[0].loss, rel=1e-6))
    assert res.rows[0].loss == pytest.approx(evaluate(vit, index, cfg, test_sizes=[32], **kw).rows[0].loss)
    assert res.rows[0].loss != pytest.approx(res.rows[1].loss)
    assert torch.equal(vit.pos_embed, pos_embed)  # the caller's model is untouched
    with pytest.raises(AssertionError, match="doesn.t match model"):  # timm: it still runs at 32 only
        vit(torch.zeros(1, 3, 48, 48))
