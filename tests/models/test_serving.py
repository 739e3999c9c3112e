"""Serving a fixed model without fixres: the timm-native export folder, the torchvision transform, the
checkpoint layouts people have on disk (compiled, DDP, Lightning, hub folders), and the Python results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint, tiny_resnet, write_image_folder
from helpers.cli import cli
from PIL import Image

import fixres
from fixres.config import DataConfig, resize_for
from fixres.data import transforms as T
from fixres.io.checkpoint import save_safetensors
from fixres.models.export import export_model
from fixres.models.hub import BUILTIN_AS_TIMM, CONFIG_NAME, timm_crop_pct
from fixres.models.loading import load_model

#: Run in a fresh interpreter that imports only timm and torch: the export loads with plain timm, offline.
TIMM_ONLY = """
import json, sys, timm, torch
m = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
cfg = timm.data.resolve_data_config({}, model=m, use_test_size=True)
tf = timm.data.create_transform(**cfg)
torch.manual_seed(1)
x = torch.randn(2, 3, int(sys.argv[2]), int(sys.argv[2]))
with torch.no_grad():
    logits = m(x)
resize = next(t for t in tf.transforms if type(t).__name__ == "Resize").size
print(json.dumps({"cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                  "labels": m.pretrained_cfg.get("label_names"), "logits": logits.tolist(), "resize": resize,
                  "modules": sorted(k for k in sys.modules if k.split(".")[0] == "fixres")}))
"""


def _timm_only(folder: Path, size: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(folder), str(size)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _logits(model, size: int) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory) -> Path:
    """``fixres fix`` on tiny data: a given checkpoint fixed at 48 px (one candidate, one epoch)."""
    tmp = tmp_path_factory.mktemp("serve")
    write_image_folder(tmp / "data" / "train", per_class=8, seed=1)
    write_image_folder(tmp / "data" / "val", per_class=3, seed=2)
    ck = save_tiny_checkpoint(tmp / "tiny.safetensors")
    from fixres.cli.app import main
    code = main(["fix", "--model", "fixres_tiny_resnet", "--checkpoint", str(ck), "--data", str(tmp / "data"),
                 "--train-size", "32", "--test-sizes", "32,48", "--test-size", "48", "--epochs", "1",
                 "--batch-size", "8", "--workers", "0", "--interpolation", "bicubic", "--mean", "0.5,0.5,0.5",
                 "--std", "0.25,0.25,0.25", "--out", str(tmp / "run"), "-q"])
    assert code == 0
    return tmp / "run" / "export"


def test_fix_export_loads_in_plain_timm_with_its_fixed_preprocessing(fixed_run):
    meta = json.loads((fixed_run / "fixres.json").read_text())
    got = _timm_only(fixed_run, 48)
    assert got["modules"] == []  # fixres itself was never imported
    cfg = got["cfg"]
    assert cfg["input_size"] == [3, 48, 48]
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.25] * 3
    assert got["resize"] == resize_for(48, meta["crop_ratio"])  # timm's floor lands on fixres's rounding
    assert got["labels"] == meta["class_names"] == ["class_0", "class_1", "class_2"]
    ours = _logits(fixres.load(fixed_run).model, 48)
    assert torch.allclose(torch.tensor(got["logits"]), ours, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILTIN_AS_TIMM) + ["timm:resnet18"])
def test_every_builtin_and_a_timm_model_export_as_timm_builds_them(tmp_path, name):
    torch.manual_seed(0)
    b = load_model(model=name, num_classes=3, train_size=32, random_init=True)
    export_model(b.model.eval(), tmp_path / "x", model_name=b.name, cfg=b.data_config, test_size=64)
    got = _timm_only(tmp_path / "x", 64)
    assert got["cfg"]["input_size"] == [3, 64, 64]
    assert torch.allclose(torch.tensor(got["logits"]), _logits(b.model, 64), atol=1e-5)


def test_a_torchvision_model_exports_without_a_timm_config(tmp_path):
    b = load_model(model="torchvision:resnet18", num_classes=3, train_size=32, random_init=True)
    export_model(b.model.eval(), tmp_path / "x", model_name=b.name, cfg=b.data_config, test_size=64)
    assert not (tmp_path / "x" / CONFIG_NAME).exists()
    usage = (tmp_path / "x" / "USAGE.md").read_text()
    assert "## torchvision" in usage and "## timm" not in usage
    assert f"v2.Resize({resize_for(64, b.data_config.crop_ratio)}" in usage


def test_timm_crop_pct_reproduces_the_rounded_resize():
    for size in range(16, 520, 8):
        for ratio in (0.8, 0.875, 0.9, 0.95, 0.966, 1.0):
            assert math.floor(size / timm_crop_pct(size, ratio)) == resize_for(size, ratio)
    assert timm_crop_pct(224, 0.875) == 0.875  # left alone where the two already agree


def test_the_torchvision_transform_equals_fixres_test_transform(tmp_path):
    cfg = DataConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic", crop_ratio=0.9)
    img = Image.fromarray(torch.randint(0, 255, (75, 100, 3), dtype=torch.uint8).numpy())
    plain = T.torchvision_transform(T.geometry_for(48, cfg, 0.9), cfg)(img)
    ours = T.test_transform(T.geometry_for(48, cfg, 0.9), cfg)(img)
    assert plain.shape == (3, 48, 48) and torch.equal(plain, ours)
    names = [type(t).__name__ for t in T._flat_ops(T.torchvision_transform(T.geometry_for(48, cfg, 0.9), cfg))]
    assert names == ["Resize", "CenterCrop", "ToImage", "ToDtype", "Normalize"]  # torchvision only


def test_load_transform_and_fix_result_give_the_fixed_model(fixed_run):
    bundle = fixres.load(fixed_run)
    assert bundle.test_size == 48
    assert "runs at 48px" in repr(bundle) and len(repr(bundle)) < 200
    sizes = [op.size for op in T._flat_ops(bundle.transform) if type(op).__name__ == "CenterCrop"]
    assert sizes == [(48, 48)]


# --------------------------------------------------------------------------- checkpoints people have

def _tiny_state(seed: int = 0) -> dict:
    return tiny_resnet(seed=seed).model.state_dict()


def _cli_eval(capsys, ck: Path, data: Path, *extra) -> tuple[int, str, str]:
    return cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", str(ck), "--data", str(data),
               "--test-size", "32", "--workers", "0", "--json", *extra)


@pytest.mark.parametrize("layout", ["compiled", "ddp", "lightning_model", "lightning_net", "lightning_mixed"])
def test_checkpoint_layouts_load_with_no_extra_flag(tmp_path, capsys, image_folder, layout):
    sd = _tiny_state()
    prefix = {"compiled": "_orig_mod.", "ddp": "module.", "lightning_model": "model.", "lightning_net": "net.",
              "lightning_mixed": "net."}[layout]
    weights = {prefix + k: v for k, v in sd.items()}
    if layout == "lightning_mixed":  # the module also holds a loss with its own buffer
        weights["criterion.weight"] = torch.ones(3)
    if layout.startswith("lightning"):
        obj = {"state_dict": weights, "hyper_parameters": {"lr": 0.1, "num_classes": 3}, "epoch": 3,
               "pytorch-lightning_version": "2.4.0"}
        ck = tmp_path / "last.ckpt"
        torch.save(obj, ck)
    else:
        ck = tmp_path / "w.safetensors"
        save_safetensors(weights, ck)
    code, out, err = _cli_eval(capsys, ck, image_folder)
    assert code == 0, err
    reference = tmp_path / "plain.safetensors"
    save_safetensors(sd, reference)
    code2, out2, _ = _cli_eval(capsys, reference, image_folder)
    assert json.loads(out)["rows"][0]["top1"] == json.loads(out2)["rows"][0]["top1"]


def test_two_models_under_two_prefixes_is_a_one_line_error_naming_both(tmp_path, capsys, image_folder):
    sd = _tiny_state()
    torch.save({"state_dict": {**{"model." + k: v for k, v in sd.items()},
                               **{"ema_model." + k: v for k, v in sd.items()}}}, tmp_path / "two.ckpt")
    code, _, err = _cli_eval(capsys, tmp_path / "two.ckpt", image_folder)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ema_model." in err and "model." in err


def test_a_hub_style_timm_folder_loads_by_checkpoint(tmp_path, capsys, image_folder, fixed_run):
    folder = tmp_path / "hub"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):  # no fixres.json: what timm's save_for_hf writes
        (folder / name).write_bytes((fixed_run / name).read_bytes())
    code, out, err = cli(capsys, "eval", "--checkpoint", str(folder), "--data", str(image_folder), "--workers", "0",
                         "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["test_size"] == 48  # the folder's test_input_size
    bundle = load_model(checkpoint=str(folder))
    assert bundle.data_config.interpolation == "bicubic" and bundle.data_config.mean == (0.5, 0.5, 0.5)
    assert torch.allclose(_logits(bundle.model, 48), _logits(fixres.load(fixed_run).model, 48), atol=1e-6)


def test_a_folder_without_a_config_is_a_one_line_error(tmp_path, capsys, image_folder):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "eval", "--checkpoint", str(tmp_path / "empty"), "--data", str(image_folder))
    assert code == 2 and "fixres.json or config.json" in err and len(err.strip().splitlines()) == 1


def _fix_result(fixed_run, **headline):
    from dataclasses import fields

    from fixres.api import FixResult
    from fixres.io.results import Headline
    from fixres.io.served import Choice
    blank = {f.name: None for f in fields(Headline)} | {"timings": {}, "seconds_total": 0.0, "served_kind": "fixed",
                                                       "n_swept_sizes": 0}
    choice = Choice(test_size=48, kind=headline.get("served_kind", "fixed"), method="held-out", reason="",
                    chosen_on="", recommended=48, n_images=0)
    return FixResult(run_dir=fixed_run.parent, report=fixed_run.parent / "report" / "index.html", export=fixed_run,
                     test_size=48, headline=Headline(**{**blank, **headline}), choice=choice)


def test_a_fix_result_holds_the_fixed_model_and_its_transform(fixed_run):
    result = _fix_result(fixed_run, top1_fixed=55.5, top1_served=55.5)
    assert repr(result) == f"FixResult(fixed at 48px, top-1 55.5, export {fixed_run})"
    served = _fix_result(fixed_run, top1_fixed=55.5, top1_served=51.0, served_kind="untuned", headline_rule="cross-val")
    assert repr(served) == f"FixResult(served as trained at 48px, top-1 51.0 cross-selected, export {fixed_run})"
    assert not result.model.training
    assert torch.equal(_logits(result.model, 48), _logits(fixres.load(fixed_run).model, 48))
    assert result.transform(Image.new("RGB", (80, 60))).shape == (3, 48, 48)


def test_results_print_short():
    from fixres.api import AdaptResult, SizeResult, SweepResult
    a = SizeResult(test_size=64, crop_ratio=0.875, top1=71.25, top1_std=0.5, top5=None, loss=None, n=340)
    b = SizeResult(test_size=96, crop_ratio=0.875, top1=73.0, top1_std=0.4, top5=None, loss=None, n=340)
    # ± is the binomial standard error of 71.25 % on 340 images, not the fold std (0.5)
    assert repr(a) == "SizeResult(64px: top-1 71.2 ± 2.5 (SE) on 340 images)"
    assert repr(SweepResult(rows=(a, b), n_images=340, train_size=64)) == \
        "SweepResult(64px 71.2, 96px 73.0; best 96px; 340 images)"
    assert repr(AdaptResult(model=torch.nn.Linear(2, 2), test_size=96, method="finetune", before=a,
                            after=b)) == "AdaptResult(finetune at 96px: top-1 71.2 -> 73.0)"
