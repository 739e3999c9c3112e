"""The shared training step (fixres.method.loop): global loss normalisation, a rank with an empty batch, resume checks.

The collectives are faked in-process (a second rank that holds some images and some gradient), so
these run in milliseconds; the 2-process torchrun tests in test_train_distributed.py and
test_finetune_distributed.py check the same rules end to end.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_classifier
from torch import nn

from fixres.errors import UsageError
from fixres.method import loop
from fixres.runtime.dist import DistEnv
from fixres.runtime.engine import Precision

FP32 = Precision(False, None, False)
#: This rank is rank 1 of 2; the collectives below are faked.
RANK1_OF_2 = DistEnv(rank=1, world_size=2, backend="gloo")
LR, MOMENTUM, WD = 0.1, 0.9, 1e-4


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _fake_second_rank(monkeypatch, *, images: int, grads: list[torch.Tensor] | None):
    """all-reduces as if the other rank held ``images`` images and (already normalised) gradients ``grads``."""
    flat_other = torch.cat([g.reshape(-1) for g in grads]) if grads else None

    def all_reduce_sum(t, env):
        if flat_other is not None and t.shape == flat_other.shape:
            return t + flat_other
        return t.clone()

    monkeypatch.setattr(loop.dist, "all_reduce_sum_int", lambda v, env: int(v) + images)
    monkeypatch.setattr(loop.dist, "all_reduce_sum", all_reduce_sum)


def test_empty_local_batch_runs_no_forward_and_takes_the_other_ranks_step(monkeypatch):
    """A rank whose images were all unreadable leaves its batch-norm buffers alone and applies
    exactly the step of the global batch (the other rank's images), momentum and weight decay included."""
    other_x, other_y = _batch(4, seed=1)
    ref = tiny_classifier()
    ref_opt = _sgd(ref)
    ref.train()
    (nn.functional.cross_entropy(ref(other_x), other_y, reduction="sum") / 4).backward()
    other_grads = [p.grad.clone() for p in ref.parameters()]
    ref_opt.step()

    mine = tiny_classifier()
    bn_before = {k: v.clone() for k, v in mine.named_buffers()}  # running mean, var, batch count
    opt = _sgd(mine)
    step = loop.Stepper(params=list(mine.parameters()), optimizer=opt, env=RANK1_OF_2, precision=FP32)
    _fake_second_rank(monkeypatch, images=4, grads=other_grads)
    forwards = []
    mine.register_forward_hook(lambda *a: forwards.append(1))
    mine.train()
    res = step(mine, None, None)

    assert forwards == [] and res.n == 0 and res.loss_sum == 0.0
    for k, v in mine.named_buffers():
        assert torch.equal(v, bn_before[k]), f"batch-norm buffer {k} moved on a blank step"
    for (name, a), b in zip(mine.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-7), name
    for a, b in zip(mine.parameters(), ref.parameters()):
        assert torch.allclose(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"], atol=1e-7)


def test_loss_and_gradient_are_normalised_by_the_global_image_count(monkeypatch):
    """2 images here, 6 on the other rank: this rank's loss is its summed loss over 8, not its own mean."""
    x, y = _batch(2, seed=2)
    model = tiny_classifier()
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    step = loop.Stepper(params=list(model.parameters()), optimizer=opt, env=RANK1_OF_2, precision=FP32)
    _fake_second_rank(monkeypatch, images=6, grads=None)  # the other rank adds nothing to the gradient
    model.train()
    res = step(model, x, y)

    start.train()
    summed = nn.functional.cross_entropy(start(x), y, reduction="sum")
    (summed / 8).backward()
    assert res.n == 2 and res.loss_sum == pytest.approx(float(summed.detach()), rel=1e-6)
    for (name, p), p0 in zip(model.named_parameters(), start.parameters()):
        assert torch.allclose(p, p0.detach() - p0.grad, atol=1e-6), name


def test_no_rank_with_images_means_no_step_anywhere(monkeypatch):
    model = tiny_classifier()
    before = copy.deepcopy(model.state_dict())
    opt = _sgd(model)
    step = loop.Stepper(params=list(model.parameters()), optimizer=opt, env=RANK1_OF_2, precision=FP32)
    _fake_second_rank(monkeypatch, images=0, grads=None)
    res = step(model, None, None)
    assert res.ms is None and not any(opt.state.values())  # no momentum buffer was even created
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_running_statistics_are_weighted_by_the_forwards_each_rank_ran(monkeypatch):
    """A rank that ran no forward in the epoch has no say in the averaged statistics."""
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(3.0)
    other_mean = torch.full((2,), 1.0, dtype=torch.float64)

    def all_reduce_sum(t, env):  # the other rank ran 5 forwards and holds running_mean 1.0
        if t.numel() == 1:
            return t + 5.0
        return t + (other_mean * 5.0 if t.shape == other_mean.shape else 0)

    monkeypatch.setattr(loop.dist, "all_reduce_sum", all_reduce_sum)
    loop.average_running_stats([bn], 0, RANK1_OF_2)
    assert torch.allclose(bn.running_mean, torch.ones(2))
    bn.running_mean.fill_(3.0)
    loop.average_running_stats([bn], 5, RANK1_OF_2)  # equal weights: the plain mean
    assert torch.allclose(bn.running_mean, torch.full((2,), 2.0))


def test_resume_check_names_every_setting_that_differs_on_one_line():
    saved = {"mean": [0.485, 0.456, 0.406], "test_size": 64, "parts": ["classifier", "bn"], "old_only": 1}
    now = {"mean": (0.5, 0.5, 0.5), "test_size": 64, "parts": ("classifier", "bn"), "new_only": 2}
    with pytest.raises(UsageError) as err:
        loop.check_resume(saved, now, now.keys(), "out/state.pt")
    msg = str(err.value)
    assert "\n" not in msg and "out/state.pt" in msg and "mean=[0.485, 0.456, 0.406] (now (0.5, 0.5, 0.5))" in msg
    assert "test_size" not in msg and "parts" not in msg and "only" not in msg  # equal, or unknown to one side
    loop.check_resume(saved, {"mean": tuple(saved["mean"])}, ["mean"], "x")  # a tuple equals its list


def test_a_state_that_does_not_fit_the_model_is_a_one_line_error():
    model = tiny_classifier()
    other = tiny_classifier(num_classes=5)  # the same layers, another classifier width
    with pytest.raises(UsageError, match=r"does not fit this model \(5\.weight: \(5, 4\) vs \(3, 4\) here\)"):
        loop.load_weights(model, other.state_dict(), "s.pt", complete=True)
    with pytest.raises(UsageError, match=r"does not fit this model \(5\.bias missing\)"):
        loop.load_weights(model, {k: v for k, v in model.state_dict().items() if k != "5.bias"}, "s.pt",
                          complete=True)
    with pytest.raises(UsageError, match="extra.weight: not in this model"):
        loop.load_weights(model, {"extra.weight": torch.zeros(1)}, "s.pt", complete=False)


def test_every_clock_read_follows_a_device_synchronise(monkeypatch):
    """CUDA runs kernels asynchronously: each timing read must wait for the device."""
    events: list[str] = []
    ticks = iter(range(100))
    monkeypatch.setattr(loop, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(loop, "clock", lambda: (events.append("clock"), float(next(ticks)))[1])
    model = tiny_classifier().train()
    step = loop.Stepper(params=list(model.parameters()), optimizer=_sgd(model), env=DistEnv(), precision=FP32)
    res = step(model, *_batch(2, seed=3))
    assert events == ["sync", "clock"] * 4
    assert res.ms == (1000.0, 1000.0, 1000.0)  # forward, backward, optimizer from the synchronised clock
