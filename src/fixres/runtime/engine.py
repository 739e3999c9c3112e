"""Running a model fast and correctly on a device: autocast, channels_last, device moves.

One ``Precision`` decides it for every command. Training (``precision_for``): bf16 autocast on CPUs
that support it, fp16 (or bf16 where supported) on CUDA, channels_last for 4-D inputs. Inference
(``inference_precision``): fp16 where the hardware runs it natively, as it keeps predictions equal to
fp32. ``--no-amp`` turns all of it off (fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    amp: bool
    dtype: torch.dtype | None
    channels_last: bool

    def describe(self) -> str:
        if not self.amp:
            return "fp32"
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))
        return f"{name} autocast" + (", channels_last" if self.channels_last else "")


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        return False
    if "AMX" in caps.upper():
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def precision_for(device: torch.device, amp: bool = True) -> Precision:
    """Default precision on ``device``; ``amp=False`` gives plain fp32."""
    if not amp:
        return Precision(False, None, False)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Precision(True, dtype, True)
    if cpu_supports_bf16():
        return Precision(True, torch.bfloat16, True)
    # No native bf16: autocast would emulate it and run slower; keep fp32 but use channels_last.
    return Precision(False, None, True)


def prepare(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if precision.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(device: torch.device, precision: Precision):
    if not precision.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def cpu_supports_fp16() -> bool:
    """True where the CPU computes fp16 natively (AVX512-FP16 or AMX-FP16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_fp16" in flags or "amx_fp16" in flags


def inference_precision(device: torch.device, amp: bool = True) -> Precision:
    """Precision for evaluation: fp16 autocast + channels_last where the hardware runs fp16 natively.

    For inference fp16 beats bf16: as fast on such CPUs, and its 10-bit mantissa keeps predictions
    equal to fp32 (EfficientNet-Lite0 on 1000 ImageNet photos: 0 of 1000 top-1 predictions changed
    with fp16, 7 with bf16). Training keeps ``engine.precision_for`` (bf16 needs no loss scaling).
    A batch whose fp16 logits are not finite is recomputed in fp32 (see ``evaluate``).
    """
    if not amp:
        return precision_for(device, amp=False)
    if device.type == "cuda" or (device.type == "cpu" and cpu_supports_fp16()):
        return Precision(True, torch.float16, True)
    return precision_for(device, amp=True)


class SingleThreaded:
    """Run a per-image transform with one intra-op thread. In-process loading (no DataLoader workers)
    calls many small tensor ops per image; with several threads they are dominated by thread
    synchronisation (up to 100x slower on a busy 2-core machine)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        before = torch.get_num_threads()
        if before == 1:
            return self.transform(img)
        torch.set_num_threads(1)
        try:
            return self.transform(img)
        finally:
            torch.set_num_threads(before)
