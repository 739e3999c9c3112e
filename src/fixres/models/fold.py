"""Folding batch norms into the convolutions that feed them, for evaluation: one layer fewer to run.

In eval mode a batch norm is a fixed affine map per channel, ``y = (x - mean) / sqrt(var + eps) *
gamma + beta``. When it reads a convolution's output directly, the map can be moved into that
convolution (weights scaled per output channel, bias shifted) and the norm dropped: the same
function in fewer passes over the activations (EfficientNet-Lite0 on a CPU spends about a fifth
of its forward pass in batch norms). Evaluation (``fixres eval`` / ``sweep``) runs a folded copy;
the caller's model is never changed, and training, fine-tuning and statistics see the real norms.

Pairs are found by structure, not by names: one probe forward pass records which tensor each
convolution produced and which tensor each batch norm read. A norm with extra behaviour (timm's
``BatchNormAct2d`` also applies dropout and an activation, held in ``drop`` and ``act``) is
replaced by those parts; a norm subclass with any other extra behaviour is left as it is. The
folded copy is kept only if its fp32 outputs on the probe equal the original's within
``FOLD_RTOL``; otherwise (a convolution output that something else also reads, a model with hooks
that observe activations) the original model is used unchanged. The copy's convolutions with TensorFlow's
"same" padding are also computed without padding their inputs first (``fixres.models.samepad``).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from fixres.models.samepad import unpad_same_convs

#: Relative tolerance (of the largest output magnitude) for the folded copy's outputs on the probe.
FOLD_RTOL = 1e-4
#: Images in the probe batch (batch norms are per-image in eval mode; two catch batch mixing).
PROBE_BATCH = 2


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution name, batch norm name) for every norm whose input is a convolution's output."""
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold the outputs so their ids stay unique during the pass
    calls: dict[str, int] = {}
    found: list[tuple[str, str]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def conv_hook(mod, args, out, name=name):
                calls[name] = calls.get(name, 0) + 1
                produced[id(out)] = name
                keep.append(out)
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            def bn_hook(mod, args, name=name):
                calls[name] = calls.get(name, 0) + 1
                if args and id(args[0]) in produced:
                    found.append((produced[id(args[0])], name))
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for c, b in found if calls.get(c) == 1 and calls.get(b) == 1]


def _replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What stays of ``bn`` once its affine map is folded away (None: a subclass we cannot reduce)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module) and set(dict(bn.named_children())) <= {"drop", "act"}:
        return nn.Sequential(drop, act)
    return None


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    if (bn.training or bn.running_mean is None or bn.running_var is None
            or conv.out_channels != bn.num_features):
        return False
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (bias - bn.running_mean.double()) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))
    return True


def fold_batchnorms(model: nn.Module, probe_size: int, *, in_chans: int = 3,
                    keep: Sequence[str] = ()) -> tuple[nn.Module, int]:
    """(a copy of eval-mode ``model`` with its conv -> batch norm pairs folded, number folded).

    ``probe_size``: a side the model accepts (the evaluation size). ``keep``: module names (and everything
    under them) left as they are, e.g. the modules after a cut whose input must stay what the unfolded model
    feeds them. Returns ``(model, 0)`` itself when nothing can be folded, the model is training or has hooks,
    or the check fails.
    """
    if model.training or _has_hooks(model):
        return model, 0
    param = next(model.parameters(), None)
    if param is None:
        return model, 0
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(PROBE_BATCH, in_chans, probe_size, probe_size, generator=gen).to(param.device, param.dtype)
    try:
        pairs = _pairs(model, probe)
    except Exception:  # noqa: BLE001 - e.g. a fixed-size model probed at another size: run it unfolded
        return model, 0
    if not pairs:
        return model, 0
    try:
        folded = copy.deepcopy(model)
    except (RuntimeError, MemoryError):  # no room for a second copy (a large model on a small GPU)
        return model, 0
    n = 0
    def kept(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in keep)

    for conv_name, bn_name in pairs:
        if kept(conv_name) or kept(bn_name):
            continue
        rest = _replacement(folded.get_submodule(bn_name))
        if rest is not None and _fold_pair(folded.get_submodule(conv_name), folded.get_submodule(bn_name)):
            folded.set_submodule(bn_name, rest)
            n += 1
    # The copy is the evaluation's: its "same"-padded convolutions also skip padding their inputs (``samepad``).
    unpadded = unpad_same_convs(folded, probe, kept=kept)
    if n == 0 and unpadded == 0:
        return model, 0
    with torch.no_grad():
        want, got = model(probe), folded(probe)
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.shape == got.shape
            and (want - got).abs().max() <= FOLD_RTOL * max(float(want.abs().max()), 1.0)):
        return model, 0
    return folded, n
