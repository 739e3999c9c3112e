"""Folding batch norms into convolutions for evaluation (fixres.models.fold): same outputs, fewer layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixres.models.fold import fold_batchnorms


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


class Small(nn.Module):
    """conv -> bn -> relu, conv (with bias) -> bn, and a norm that reads a ReLU (not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.b3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.b3(torch.relu(self.b2(self.c2(x))))
        return self.head(x.mean((2, 3)))


class SharedOutput(Small):
    """The first conv's output is read by its norm *and* added back: folding would change the sum."""

    def forward(self, x):
        y = self.c1(x)
        x = torch.relu(self.b1(y) + y.mean())
        return self.head(self.b2(self.c2(x)).mean((2, 3)))


def test_folds_conv_norm_pairs_and_keeps_the_function():
    torch.manual_seed(0)
    model = _randomise_norms(Small())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, n = fold_batchnorms(model, 16)
    assert n == 2  # b1 and b2; b3 reads a ReLU
    assert isinstance(folded.b1, nn.Identity) and isinstance(folded.b2, nn.Identity)
    assert isinstance(folded.b3, nn.BatchNorm2d)
    x = torch.randn(4, 3, 20, 24)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # The caller's model is untouched.
    assert isinstance(model.b1, nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_refuses_when_a_conv_output_is_also_read_elsewhere():
    torch.manual_seed(0)
    model = _randomise_norms(SharedOutput())
    folded, n = fold_batchnorms(model, 16)
    assert n == 0 and folded is model


def test_training_models_and_models_with_hooks_are_not_folded():
    model = _randomise_norms(Small())
    model.train()
    assert fold_batchnorms(model, 16) == (model, 0)
    model.eval()
    handle = model.c1.register_forward_hook(lambda *a: None)
    assert fold_batchnorms(model, 16) == (model, 0)
    handle.remove()
    assert fold_batchnorms(model, 16)[1] == 2


def test_timm_norm_act_layers_keep_their_activation():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model("tf_efficientnet_lite0", num_classes=7))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded, n = fold_batchnorms(model, 64)
    assert n == norms > 40  # every norm of EfficientNet-Lite reads a convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 72, 64)
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_evaluate_runs_the_folded_copy_with_the_same_predictions(tmp_path, monkeypatch):
    from fixres.config import DataConfig
    from fixres.method import evaluate as ev
    from fixres.runtime.engine import Precision

    torch.manual_seed(0)
    model = _randomise_norms(Small())
    images = _images(tmp_path)
    cfg = DataConfig(train_size=16, num_classes=5)
    fp32 = Precision(False, torch.float32, False)
    seen = []
    real = ev.fold_batchnorms

    def spy(m, size, **kw):
        out = real(m, size, **kw)
        seen.append(out[1])
        return out

    monkeypatch.setattr(ev, "fold_batchnorms", spy)
    a = ev.evaluate(model, images, cfg, test_sizes=[16, 24], precision=fp32, workers=0, progress=False)
    monkeypatch.setattr(ev, "fold_batchnorms", lambda m, size, **kw: (m, 0))
    b = ev.evaluate(model, images, cfg, test_sizes=[16, 24], precision=fp32, workers=0, progress=False)
    assert seen == [2]
    for ra, rb in zip(a.rows, b.rows):
        assert ra.correct == rb.correct and ra.loss == pytest.approx(rb.loss, rel=1e-5)
    assert isinstance(model.b1, nn.BatchNorm2d)


def _images(tmp_path, n: int = 10) -> list[tuple[str, int]]:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(p)
        out.append((str(p), i % 5))
    return out


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 2, 1), (5, 2, 1), (3, 1, 1), (4, 2, 1), (3, 3, 1),
                                                      (3, 2, 2), (1, 2, 1), (7, 4, 1)])
def test_same_padding_without_the_padded_copy_gives_the_padded_convolution(kernel, stride, dilation):
    import torch.nn.functional as F

    from fixres.models.samepad import same_conv2d, same_pads
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    # (3 -> 6) channels: a stem whose input is smaller than its output at stride 1 (the input is padded) and larger
    # at stride 2; (8 -> 2): always larger (the last row and column computed apart), in either memory layout.
    for cin, cout, layout in ((3, 6, torch.contiguous_format), (8, 2, torch.contiguous_format),
                              (8, 2, torch.channels_last)):
        w, b = torch.randn(cout, cin, kernel, kernel, generator=g), torch.randn(cout, generator=g)
        for h, wd in ((16, 16), (17, 15), (5, 9), (2, 3), (1, 1), (31, 30)):
            x = torch.randn(2, cin, h, wd, generator=g).contiguous(memory_format=layout)
            (top, bottom), (left, right) = (same_pads(h, kernel, stride, dilation),
                                            same_pads(wd, kernel, stride, dilation))
            want = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation)
            got = same_conv2d(x, w, b, (stride, stride), (dilation, dilation), 1)
            assert got.shape == want.shape == (2, cout, -(-h // stride), -(-wd // stride))
            assert torch.allclose(got, want, atol=1e-5), (cin, h, wd, layout)
            if layout is torch.channels_last and min(got.shape[-2:]) > 1:
                assert got.is_contiguous(memory_format=torch.channels_last)

class BeforeHeavy(nn.Conv2d):
    """Pads its input with a zero before (not after), to "same" size: not TensorFlow's "same" padding."""

    def forward(self, x):
        return self._conv_forward(nn.functional.pad(x, (1, 0, 1, 0)), self.weight, self.bias)


class TfSame(nn.Module):
    """timm's TensorFlow-"same" stride-2 convolutions (padding their inputs on every call) feeding batch norms, one of
    them under a name kept as it is, and a convolution padding more before than after (not "same")."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Conv2dSame
        self.c1, self.b1 = Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False), nn.BatchNorm2d(8)
        self.kept = Conv2dSame(8, 8, 3, stride=2)
        self.odd = BeforeHeavy(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.kept(torch.relu(self.b2(self.c2(x))))
        x = self.odd(x)
        return self.head(x.mean((2, 3)))


def test_the_evaluation_copy_computes_same_padding_without_padding():
    from timm.layers import Conv2dSame

    from fixres.models.samepad import SameConv2d
    model = _randomise_norms(TfSame())
    folded, n = fold_batchnorms(model, 64, keep=["kept"])
    assert n == 2
    assert isinstance(folded.c1, SameConv2d) and isinstance(folded.c2, SameConv2d)
    assert type(folded.kept) is Conv2dSame and type(folded.odd) is BeforeHeavy
    assert type(model.c1) is Conv2dSame  # the caller's model is left as it was
    x = torch.randn(3, 3, 57, 57, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
