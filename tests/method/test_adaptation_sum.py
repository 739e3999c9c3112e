"""Appendix A.2 matches the tensor the last activation reads: on a ResNet the residual sum (``bn + shortcut``),
on an EfficientNet the last batch-norm's output. After ``gaussian`` the per-channel mean and std of that tensor
at the test size S equal their values at the train size T."""

from __future__ import annotations

import pytest
import torch
from helpers import fp32, tiny_bundle, write_image_folder

from fixres.data.folders import scan_folder
from fixres.method.adaptation import adapt
from fixres.method.stats import iterate_views, pooled_point
from fixres.models.residual import apply_affine, find_last_sum
from fixres.models.structure import find_parts

T, S = 32, 64
KW = dict(workers=0, progress=False, batch_size=8)
#: The tensor each model's last activation reads, named here only to check what the library found by tracing:
#: (module, which of its calls in one forward pass); the module's input is the tensor.
READ_AT = {"resnet10t": ("layer4.0.act2", 0), "torchvision:resnet18": ("layer4.1.relu", 1),
           "tf_efficientnet_lite0": ("bn2.act", 0)}


def _bundle(name: str):
    return tiny_bundle(0, train_size=T, model=name)


def _moments(model, samples, cfg, size, name, call):
    """Per-channel mean and std of the input of ``name`` at its ``call``-th call in each forward pass."""
    got, count = [], [0]

    def hook(mod, args):
        count[0] += 1
        got.append((count[0], args[0].detach().double().clone()))
    model.eval()
    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            per_pass = None
            for views, _, _ in iterate_views(samples, cfg, [size], progress=False, workers=0, batch_size=8):
                before = count[0]
                model(views[0])
                per_pass = count[0] - before
    finally:
        handle.remove()
    t = torch.cat([x for k, x in got if (k - 1) % per_pass == call])
    return t.mean(dim=(0, 2, 3)), t.std(dim=(0, 2, 3), unbiased=False)


@pytest.fixture
def photos(tmp_path):
    return scan_folder(write_image_folder(tmp_path / "photos", per_class=4))


@pytest.mark.parametrize("name", sorted(READ_AT))
def test_gaussian_matches_what_the_last_activation_reads(name, photos):
    b = _bundle(name)
    where, call = READ_AT[name]
    mu_t, sd_t = _moments(b.model, photos, b.data_config, T, where, call)
    mu_s, sd_s = _moments(b.model, photos, b.data_config, S, where, call)
    assert not torch.allclose(sd_s, sd_t, rtol=0.05)  # the premise: the two sizes differ before
    res = adapt(b.model, photos, b.data_config, method="gaussian", train_size=T, test_size=S, precision=fp32(), **KW)
    mu_a, sd_a = _moments(b.model, photos, b.data_config, S, where, call)
    scale = sd_t.abs().max()
    assert torch.allclose(mu_a, mu_t, atol=1e-4 * scale + 1e-5)
    assert torch.allclose(sd_a, sd_t, rtol=1e-3, atol=1e-5)
    assert ("residual_sum" in res) == (name != "tf_efficientnet_lite0")


def test_the_sum_is_found_by_structure_not_by_names():
    b = _bundle("torchvision:resnet18")
    last = find_last_sum(b.model, pooled_point(find_parts(b.model)))
    assert (last.consumer, last.occurrence, last.calls_per_forward) == ("layer4.1.relu", 1, 2)
    # the identity shortcut is the previous block's sum: scaled there, the next convolution compensated
    assert set(last.scale_bns) == {"layer4.1.bn2", "layer4.0.bn2", "layer4.0.downsample.1"}
    assert last.divide_inputs == ["layer4.1.conv1"]
    e = _bundle("tf_efficientnet_lite0")
    assert find_last_sum(e.model, pooled_point(find_parts(e.model))) is None  # BatchNormAct: the norm feeds it


def test_the_affine_map_on_the_sum_changes_nothing_but_the_sum(photos):
    """sum -> r * sum + t written into the weights: the logits change only through the last activation."""
    b = _bundle("torchvision:resnet18")
    last = find_last_sum(b.model, pooled_point(find_parts(b.model)))
    where, call = READ_AT["torchvision:resnet18"]
    mu, sd = _moments(b.model, photos, b.data_config, T, where, call)
    r = torch.linspace(0.5, 2.0, mu.numel()).double()
    t = torch.linspace(-0.3, 0.3, mu.numel()).double()
    apply_affine(b.model, last, r, t)
    mu_a, sd_a = _moments(b.model, photos, b.data_config, T, where, call)
    assert torch.allclose(mu_a, r * mu + t, atol=1e-4) and torch.allclose(sd_a, r * sd, rtol=1e-4, atol=1e-6)
