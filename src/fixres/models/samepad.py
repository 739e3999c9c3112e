"""Convolutions with TensorFlow's "same" padding, computed without a padded copy of their input.

A "same" convolution (TensorFlow's ``padding="SAME"``, timm's ``Conv2dSame`` in the ``tf_`` EfficientNets and
MixNets) has ``ceil(size / stride)`` outputs per side and pads ``total = (outputs - 1) * stride + span - size``
zeros, ``total // 2`` before and the rest after: one more after than before where ``total`` is odd. PyTorch's
convolution pads symmetrically only, so such a layer usually pads its whole input first, a full copy of the
activation on every call (at 224 px on a CPU, the padding of lite0's stride-2 layers takes longer than their
convolutions). ``same_conv2d`` computes the same outputs as a convolution with the symmetric padding ``before``
and, where one output row or column is still missing, that row or column from the input's last few rows or
columns alone, written into the full-size output: the same sums over the same values, copying the (strided,
smaller) output once instead of the input. Where the input is the smaller of the two (a stem reading three
colour channels), the input is padded as before.

``unpad_same_convs`` finds such layers by what they do, not by their class: in a probe pass, a convolution with
more outputs than its own ``padding`` gives, as many as "same" padding gives, and whose outputs ``same_conv2d``
reproduces from its inputs, is replaced by a ``SameConv2d`` sharing its weights. The caller (the evaluation
copy of ``fixres.models.fold``) checks the whole model's outputs after the change as well.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fixres.models.hooks import hooked

#: Relative tolerance (of the largest output magnitude) for a layer's outputs computed without the padded copy.
SAME_RTOL = 1e-5


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) zeros that "same" padding adds to one side of ``size``."""
    span = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def same_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """``F.conv2d`` of ``x`` padded as "same" padding pads it, without padding ``x`` itself."""
    (ih, iw), (kh, kw) = x.shape[-2:], weight.shape[-2:]
    (top, bottom), (left, right) = (same_pads(ih, kh, stride[0], dilation[0]),
                                    same_pads(iw, kw, stride[1], dilation[1]))
    oh, ow = math.ceil(ih / stride[0]), math.ceil(iw / stride[1])
    span_h, span_w = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    last_row, last_col = (oh - 1) * stride[0] - top, (ow - 1) * stride[1] - left
    if (min(last_row, last_col) < 0 or ih + 2 * top < span_h or iw + 2 * left < span_w
            or x.shape[1] * ih * iw <= weight.shape[0] * oh * ow):
        # An input about one window in size (the symmetric convolution has no output), or one smaller than the
        # output (a stem from a few colour channels): padding the input copies the least.
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)
    out = F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    h, w = out.shape[-2:]
    if (h, w) == (oh, ow):
        return out
    # One copy of the output into its full size, the missing last column and row written in place.
    layout = torch.channels_last if out.dim() == 4 and not out.is_contiguous() else torch.contiguous_format
    full = torch.empty((*out.shape[:-2], oh, ow), dtype=out.dtype, device=out.device, memory_format=layout)
    full[..., :h, :w] = out
    if w < ow:  # the last column: its window overhangs the input's right edge by one more zero
        tail = F.pad(x[..., last_col:], (0, span_w - (iw - last_col)))
        full[..., :h, w:] = F.conv2d(tail, weight, bias, stride, (top, 0), dilation, groups)
    if h < oh:  # the last row, every column of it
        tail = F.pad(x[..., last_row:, :], (left, right, 0, span_h - (ih - last_row)))
        full[..., h:, :] = F.conv2d(tail, weight, bias, stride, 0, dilation, groups)
    return full

class SameConv2d(nn.Conv2d):
    """A convolution with "same" padding (``same_conv2d``), holding another convolution's weights."""

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> "SameConv2d":
        same = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=0,
                   dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                   device="meta")
        same.weight, same.bias = conv.weight, conv.bias
        return same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_conv2d(x, self.weight, self.bias, self.stride, self.dilation, self.groups)


def _pads_same(conv: nn.Conv2d, size_in: tuple[int, int], size_out: tuple[int, int]) -> bool:
    """True when ``conv`` turned ``size_in`` into ``size_out`` as "same" padding does, beyond its own padding."""
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return False
    own = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                zip(size_in, conv.padding, conv.dilation, conv.kernel_size, conv.stride))
    same = tuple(math.ceil(n / s) for n, s in zip(size_in, conv.stride))
    return tuple(size_out) == same != own and not any(conv.padding)


def unpad_same_convs(model: nn.Module, probe: torch.Tensor, *, kept: Callable[[str], bool]) -> int:
    """Replace, in place, each convolution of ``model`` whose output on the probe is its input "same"-padded and
    convolved (checked on the probe itself, within ``SAME_RTOL``) by a ``SameConv2d``; ``kept(name)``: leave that
    module as it is. Returns how many were replaced."""
    calls: dict[str, int] = {}
    same: set[str] = set()

    def hook(name: str):
        def record(mod, args, out):
            calls[name] = calls.get(name, 0) + 1
            if _pads_same(mod, tuple(args[0].shape[-2:]), tuple(out.shape[-2:])):
                mine = same_conv2d(args[0], mod.weight, mod.bias, mod.stride, mod.dilation, mod.groups)
                if mine.shape == out.shape and (mine - out).abs().max() <= SAME_RTOL * max(float(out.abs().max()), 1.0):
                    same.add(name)
        return record

    convs = [(m, "forward", hook(name)) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and type(m) is not SameConv2d and not kept(name)]
    with hooked(convs), torch.no_grad():
        model(probe)
    replaced = [name for name in same if calls[name] == 1]
    for name in replaced:
        model.set_submodule(name, SameConv2d.sharing(model.get_submodule(name)))
    return len(replaced)
