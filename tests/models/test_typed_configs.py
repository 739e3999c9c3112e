"""The typed views of the JSON documents models are loaded from: fixres.json (``ExportMeta``), timm's
pretrained_cfg and config.json (``PretrainedView``, ``TimmConfig``), a bundle's record and the hub environment."""

from __future__ import annotations

import json

import pytest
from torch import nn

from fixres.config import DEFAULT_INTERPOLATION, IMAGENET_MEAN, DataConfig
from fixres.io.meta import ExportMeta, build_meta, parse_export_meta, read_header_meta
from fixres.models import pretrained
from fixres.models.bundle import ModelBundle
from fixres.models.timmcfg import (
    PretrainedView,
    model_pretrained_view,
    model_traits,
    pretrained_view,
    read_timm_config,
    timm_data_config,
)


def _meta(**extra) -> dict:
    cfg = DataConfig(crop_ratio=0.9, train_size=32)
    return build_meta(model_name="fixres_tiny_resnet", cfg=cfg, test_size=48, train_size=32, num_classes=2,
                      class_names=["a", "b"], accuracy=None, extra=extra or None)


def test_export_meta_reads_every_field_of_a_built_fixres_json():
    export = parse_export_meta(_meta(model_kwargs={"img_size": [48, 48]}))
    assert isinstance(export, ExportMeta)
    assert (export.model, export.num_classes, export.class_names) == ("fixres_tiny_resnet", 2, ("a", "b"))
    assert (export.train_size, export.test_size, export.crop_ratio) == (32, 48, 0.9)
    assert export.test_input_size == (3, 48, 48) and export.model_kwargs == {"img_size": [48, 48]}
    assert export.mean == IMAGENET_MEAN


def test_export_meta_without_model_kwargs_rebuilds_with_none():
    assert parse_export_meta(_meta()).model_kwargs == {}


def test_a_bundle_reads_its_record_through_types():
    cfg = DataConfig(train_size=32)
    bundle = ModelBundle(nn.Linear(2, 2), cfg, "m", "checkpoint", {"export": _meta()})
    assert bundle.export is not None and bundle.export.test_size == 48 and bundle.test_size == 48
    assert bundle.new_head is None
    plain = ModelBundle(nn.Linear(2, 2), cfg, "m", "timm", {"test_size": 40})
    assert plain.export is None and plain.test_size == 40
    plain.meta["new_head"] = 5  # callers add to meta: the record is read at each use
    assert plain.new_head == 5
    assert ModelBundle(nn.Linear(2, 2), cfg, "m", "timm").test_size == 32


def test_a_timm_pretrained_cfg_with_tuples_reads_as_a_view():
    view = pretrained_view({"input_size": (3, 256, 256), "mean": (0.5, 0.5, 0.5), "crop_pct": 0.95,
                            "interpolation": "bicubic", "fixed_input_size": True, "classifier": ("head", "dist")})
    assert view.input_size == (3, 256, 256) and view.mean == (0.5, 0.5, 0.5) and view.fixed_input_size
    assert view.classifier == ["head", "dist"]
    cfg = timm_data_config(view, train_size=None, stride=32)
    assert (cfg.train_size, cfg.crop_ratio, cfg.interpolation) == (256, 0.95, "bicubic")


def test_wrong_or_missing_timm_fields_read_as_timm_defaults():
    view = pretrained_view({"input_size": "big", "interpolation": "random", "crop_pct": None})
    assert view == PretrainedView(interpolation="random")
    cfg = timm_data_config({"interpolation": "random"}, train_size=64, stride=16)
    assert (cfg.interpolation, cfg.train_size, cfg.stride) == (DEFAULT_INTERPOLATION, 64, 16)
    assert pretrained_view(None) == PretrainedView()


def test_a_model_without_timm_attributes_has_default_views():
    model = nn.Linear(2, 2)
    assert model_pretrained_view(model) == PretrainedView() and model_traits(model).img_size is None
    model._traits = {"img_size": (64, 64)}
    assert model_traits(model).img_size == (64, 64)


def test_a_config_json_needs_an_architecture():
    assert read_timm_config({"num_classes": 3}) is None
    assert read_timm_config([1]) is None
    config = read_timm_config({"architecture": "resnet18", "num_classes": 3, "model_args": {"layers": [1, 1, 1, 1]},
                               "pretrained_cfg": {"test_input_size": [3, 80, 80]}})
    assert config.architecture == "resnet18" and config.num_classes == 3
    assert config.model_args == {"layers": [1, 1, 1, 1]} and config.pretrained_cfg.test_input_size == (3, 80, 80)


def test_a_safetensors_header_with_odd_metadata_holds_no_fixres_json(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"__metadata__": ["not", "an", "object"]}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert read_header_meta(path) is None


@pytest.mark.parametrize("cache,home,expected", [("C", "H", "C"), ("", "H", "H/hub")])
def test_the_hub_environment_is_read_when_asked(monkeypatch, tmp_path, cache, home, expected):
    for name, value in (("HF_HUB_CACHE", cache), ("HF_HOME", home)):
        if value:
            monkeypatch.setenv(name, str(tmp_path / value))
        else:
            monkeypatch.delenv(name, raising=False)
    assert pretrained._hf_cache_dir() == tmp_path / expected
    monkeypatch.setenv("HF_HUB_OFFLINE", " Yes ")
    assert pretrained.is_offline() and pretrained.hub_environment().offline == " Yes "
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not pretrained.is_offline()
