"""Pooled-activation statistics (figures 3/4), hook hygiene, export + read-back, and the CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import fp32, tiny_bundle, tiny_data  # noqa: F401

from fixres.method.stats import activation_stats
from fixres.models.hooks import capture, count_hooks, trace_calls
from fixres.report.plots import plot_stats

#: A figure smaller than this (pixels a side) is not a readable plot.
MIN_FIGURE_PX = 200


def assert_real_png(path) -> None:
    """A PNG that decodes completely, of a plot's size, with real content (not a blank canvas)."""
    from PIL import Image
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes every byte: a truncated file fails here
        assert min(img.size) >= MIN_FIGURE_PX, img.size
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert arr.std() > 5  # lines and text on the background


def test_activation_stats_show_sparsity_falling_with_size(tmp_path):
    train, _ = tiny_data(tmp_path / "d")
    b = tiny_bundle()
    res = activation_stats(b.model, train, b.data_config, test_sizes=[16, 32, 64], precision=fp32(), workers=0,
                           progress=False, batch_size=8)
    rows = {r["test_size"]: r for r in res["sizes"]}
    for r in rows.values():
        cdf = np.array(r["cdf"])
        assert np.all(np.diff(cdf) >= 0) and 0 <= cdf[0] and cdf[-1] <= 1
        assert cdf[0] == pytest.approx(r["frac_zero"], abs=1e-9)  # the grid starts at 0: the CDF jump is the zeros
        assert r["n_values"] == 18 * 128
    # section 3.2: a smaller input pools fewer positions, so more pooled activations are exactly zero
    assert rows[16]["frac_zero"] > rows[64]["frac_zero"]
    png = plot_stats(res, tmp_path / "cdf.png", compare=res)
    assert_real_png(png)
    assert count_hooks(b.model) == 0


def test_hooks_are_removed_even_after_an_exception(tiny_model):
    model = tiny_model.model.eval()

    def boom(mod, args, out):
        raise RuntimeError("boom")

    model.fc.register_forward_hook(boom)  # an unrelated failure in the middle of the forward
    base = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["global_pool", "layer4"], where="input"):
            assert count_hooks(model) == base + 2
            model(torch.zeros(1, 3, 32, 32))
    assert count_hooks(model) == base
    with pytest.raises(RuntimeError, match="boom"):
        with trace_calls(model):
            model(torch.zeros(1, 3, 32, 32))
    assert count_hooks(model) == base


def test_export_reads_back_with_no_flags(tmp_path):
    from fixres.errors import UsageError
    from fixres.method.adaptation import Equalization, install_equalization
    from fixres.models.export import export_model
    from fixres.models.loading import load_model
    b = tiny_bundle()
    cfg = b.data_config.with_overrides(crop_ratio=0.9)
    path = export_model(b.model, tmp_path / "x", model_name=b.name, cfg=cfg, test_size=64, train_size=32,
                        class_names=["a", "b", "c"], accuracy={"top1": 61.0, "top1_std": 1.5}, onnx=True)
    meta = json.loads((tmp_path / "x" / "fixres.json").read_text())
    assert meta["input_size"] == [3, 32, 32] and meta["test_input_size"] == [3, 64, 64]
    assert meta["crop_pct"] == meta["test_crop_pct"] == meta["crop_ratio"] == 0.9
    assert meta["test_size"] == 64 and meta["class_names"] == ["a", "b", "c"] and meta["num_classes"] == 3
    assert meta["accuracy"]["top1"] == 61.0
    _check_onnx(meta["onnx"], tmp_path / "x" / "model.onnx", b.model)
    back = load_model(checkpoint=str(path))
    assert back.name == "fixres_tiny_resnet" and back.data_config.crop_ratio == 0.9
    assert back.data_config.train_size == 32 and back.data_config.class_names == ("a", "b", "c")
    assert back.meta["export"]["test_size"] == 64
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(b.model.eval()(x), back.model.eval()(x))
    install_equalization(b.model, Equalization(1, 1, 1, 1, "global_pool", "output"))
    with pytest.raises(UsageError, match="cannot be exported"):
        export_model(b.model, tmp_path / "y", model_name=b.name, cfg=cfg, test_size=64)


def _check_onnx(info: dict, path, model) -> None:
    """ONNX is written and runs to the same logits when onnx is installed (the test extras install it);
    without it, nothing is written and the metadata says why."""
    try:
        import onnx
        from onnx.reference import ReferenceEvaluator
    except ImportError:
        assert info["written"] is False and "onnx" in info["reason"] and not path.exists()
        return
    assert info["written"] is True and info["input_size"] == [1, 3, 64, 64] and path.is_file()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    x = torch.randn(3, 3, 64, 64)  # another batch size than the export's: the batch axis is dynamic
    got = ReferenceEvaluator(proto).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_cli_finetune_adapt_stats(tmp_path, capsys):
    from fixres.cli.app import main
    tiny_data(tmp_path / "d")
    base = ["--model", "fixres_tiny_resnet", "--random-init", "--num-classes", "3", "--train-size", "32",
            "--data", str(tmp_path / "d"),
            "--workers", "0", "--no-amp", "-q"]
    assert main(["finetune", *base, "--test-size", "48", "--epochs", "2", "--batch-size", "4",
                 "--out", str(tmp_path / "ft"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cache"]["used"] and out["after"]["n"] == 9 and out["lr"] == pytest.approx(0.008 * 4 / 512)
    meta = json.loads((tmp_path / "ft" / "fixres.json").read_text())
    assert meta["test_size"] == 48 and meta["adaptation"]["method"] == "finetune"
    # With no --test-size, eval of an export runs where the model was fixed (48), not at its train size (32).
    assert main(["eval", "--checkpoint", str(tmp_path / "ft" / "model.safetensors"), "--data", str(tmp_path / "d"),
                 "--workers", "0", "--no-amp", "-q", "--out", str(tmp_path / "ev"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert [r["test_size"] for r in ev["rows"]] == [48] and ev["train_size"] == 32
    assert ev["rows"][0]["top1"] == pytest.approx(out["after"]["top1"])
    ck = ["--checkpoint", str(tmp_path / "ft" / "model.safetensors"), "--data", str(tmp_path / "d"),
          "--workers", "0", "--no-amp", "-q"]
    assert main(["adapt", *ck, "--method", "bn-recalibrate", "--test-size", "64", "--out", str(tmp_path / "ad"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels_used"] is False and (tmp_path / "ad" / "model.safetensors").is_file()
    assert main(["stats", *ck, "--sizes", "32,64", "--out", str(tmp_path / "st"), "--json",
                 "--compare", str(tmp_path / "ad" / "model.safetensors")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["test_size"] for r in out["after"]["sizes"]] == [32, 64]
    assert_real_png(tmp_path / "st" / "activation_cdf.png")
    assert main(["finetune", *base, "--parts", "nonsense"]) == 2
