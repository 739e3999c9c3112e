"""Paths of fixres.models.inputsize and fixres.models.pretrained that the model-family tests do not reach offline:
a fixed-size model whose resize fails (one line naming the size it was built for), timm traits missing
(older timm), where the Hugging Face cache is, a cached timm file found, weights only at a URL, and
unknown torchvision weights or tags (a UsageError naming the choices)."""

from __future__ import annotations

import os
import types

import pytest
import torch
from torch import nn

from fixres.errors import FixresError, UsageError
from fixres.models import inputsize, pretrained


class _FixedSize(nn.Module):
    """A model that says it runs only at 48 px (timm's pretrained_cfg convention)."""

    def __init__(self, resize_error: Exception | None = None) -> None:
        super().__init__()
        self.pretrained_cfg = {"fixed_input_size": True, "input_size": (3, 48, 48)}
        self.resize_error = resize_error

    def set_input_size(self, img_size):
        raise self.resize_error


@pytest.mark.parametrize("error,shown", [(ValueError("window 7 does not divide 9\nlong trace"),
                                          "window 7 does not divide 9"),
                                         (RuntimeError(""), "RuntimeError")])
def test_a_failing_resize_is_one_line_naming_the_built_size(error, shown):
    with pytest.raises(FixresError) as info:
        inputsize.fit_input_size(_FixedSize(error), 64, name="swinish")
    assert str(info.value) == f"swinish cannot run at 64x64 px: {shown}; it was built for 48x48"


def test_native_size_without_timm_traits_reads_the_pretrained_cfg(monkeypatch):
    import timm.models._input as timm_input

    def old_timm(model):
        raise AttributeError("no traits in this timm")
    monkeypatch.setattr(timm_input, "get_model_input_config", old_timm)
    assert inputsize.native_size(_FixedSize()) == 48
    flexible = nn.Conv2d(3, 3, 1)
    flexible.pretrained_cfg = {"input_size": (3, 224, 224)}
    assert inputsize.native_size(flexible) is None


class _TokensOnly(nn.Module):
    """A ViT-like whose position embedding holds fewer tokens than its patch grid (not resamplable)."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained_cfg = {"fixed_input_size": True, "input_size": (3, 32, 32)}
        self.patch_embed = types.SimpleNamespace(grid_size=(4, 4), set_input_size=lambda **k: None)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 8))


def test_a_position_embedding_that_does_not_fit_its_grid_is_refused():
    with pytest.raises(FixresError, match=r"runs only at 32x32 px .*use test size 32"):
        inputsize.fit_input_size(_TokensOnly(), 64)


def test_resampled_vit_records_its_new_size_without_timm_traits(monkeypatch):
    """CaiT-like models (no set_input_size) are resampled; on a timm without update_model_input_size the
    new size is written into pretrained_cfg, so an export records the size the model now runs at."""
    import timm
    import timm.models._input as timm_input
    model = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=3, img_size=32, patch_size=16)
    monkeypatch.delattr(timm_input, "update_model_input_size")
    assert inputsize.fit_input_size(model, 64) == {"img_size": [64, 64]}
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


# --------------------------------------------------------------------------- pretrained: caches and names


def test_the_hugging_face_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert pretrained._hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert pretrained._hf_cache_dir() == tmp_path / "hub"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    from huggingface_hub import constants
    assert pretrained._hf_cache_dir() == type(pretrained._hf_cache_dir())(constants.HF_HUB_CACHE)


def test_weights_only_loads_restores_a_previous_setting(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    with pretrained.weights_only_loads():
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "0"


def test_a_cached_timm_file_is_found_without_the_network(monkeypatch, tmp_path):
    """The Hugging Face cache layout (refs/main -> snapshots/<rev>/file) is read as huggingface_hub writes it."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg("resnet18")
    repo = cfg.hf_hub_id.split("@")[0]
    filename = cfg.hf_hub_filename or "model.safetensors"
    folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / filename).write_bytes(b"weights")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path, how = pretrained.timm_pretrained_file("resnet18")
    assert path is not None and path.read_bytes() == b"weights" and how == ""


def test_timm_weights_only_at_a_url_or_nowhere(monkeypatch, tmp_path):
    import timm.models
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    url_cfg = types.SimpleNamespace(hf_hub_id=None, hf_hub_filename=None, url="https://example.org/w/net.pth")
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: url_cfg)
    path, how = pretrained.timm_pretrained_file("net")
    assert path is None and how == f"https://example.org/w/net.pth into {tmp_path / 'checkpoints'}"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "net.pth").write_bytes(b"x")
    assert pretrained.timm_pretrained_file("net")[0] == tmp_path / "checkpoints" / "net.pth"
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: types.SimpleNamespace(
        hf_hub_id=None, hf_hub_filename=None, url=None))
    with pytest.raises(UsageError, match="no downloadable weights for 'net'"):
        pretrained.timm_pretrained_file("net")
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    with pytest.raises(UsageError, match="no pretrained weights for 'net'"):
        pretrained.timm_pretrained_file("net")


def test_unknown_torchvision_weights_are_usage_errors():
    with pytest.raises(UsageError, match="torchvision has no pretrained weights for 'resnet_nope'"):
        pretrained.torchvision_weights("resnet_nope")
    with pytest.raises(UsageError, match=r"no weights 'IMAGENET9K'; choose one of IMAGENET1K_V1, IMAGENET1K_V2"):
        pretrained.torchvision_weights("resnet50", "IMAGENET9K")
    assert pretrained.torchvision_weights("resnet50", "IMAGENET1K_V2").name == "IMAGENET1K_V2"
