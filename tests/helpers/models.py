"""Tiny models for the tests: the library's ``fixres_tiny_resnet`` (seeded), the same with non-degenerate
batch norms, its weights as a checkpoint file, a hand-built conv classifier, and fp32 precision.

torch is imported inside the functions, so that importing the helpers (conftest does) stays cheap.
"""

from __future__ import annotations

from pathlib import Path

#: The library's smallest model, what most tests run.
TINY_RESNET = "fixres_tiny_resnet"


def fp32():
    """Plain float32 precision (no autocast, no scaler): bit-reproducible on the CPU."""
    from fixres.runtime.engine import Precision
    return Precision(False, None, False)


def _seeded(model: str, *, num_classes: int, train_size: int, seed: int):
    import torch

    from fixres.models.loading import load_model
    torch.manual_seed(seed)
    return load_model(model=model, num_classes=num_classes, train_size=train_size)


def tiny_resnet(num_classes: int = 3, *, seed: int = 0, train_size: int = 32):
    """The bundle of ``fixres_tiny_resnet``, randomly initialised after ``torch.manual_seed(seed)``."""
    return _seeded(TINY_RESNET, num_classes=num_classes, train_size=train_size, seed=seed)


def tiny_bundle(seed: int = 0, *, train_size: int = 32, model: str = TINY_RESNET):
    """``model`` (fixres_tiny_resnet by default) with 3 classes and random but not degenerate batch-norm weights
    and statistics (timm zero-inits the last norm of a block)."""
    import torch
    bundle = _seeded(model, num_classes=3, train_size=train_size, seed=seed)
    with torch.no_grad():
        for m in bundle.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return bundle


def save_tiny_checkpoint(path: Path, *, num_classes: int = 3, seed: int = 0) -> Path:
    """Weights of ``fixres_tiny_resnet`` with ``num_classes`` outputs as safetensors (fixed seed)."""
    from fixres.io.checkpoint import save_safetensors
    save_safetensors(tiny_resnet(num_classes, seed=seed).model.state_dict(), path)
    return path


def tiny_classifier(num_classes: int = 3, *, widths=(4,), norms=("batch",), stride: int = 1, seed: int = 0):
    """A hand-built ``nn.Sequential`` classifier, seeded: per stage a 3x3 convolution (``stride``, padding 1),
    then a ``BatchNorm2d`` where that stage's entry of ``norms`` is ``"batch"`` (None: no norm), then ReLU;
    then global average pooling, flatten and a linear layer. Its state-dict keys are the layers' indexes."""
    import torch
    from torch import nn
    if len(norms) != len(widths):
        raise ValueError(f"one norm per stage: widths {widths}, norms {norms}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 3
    for width, norm in zip(widths, norms):
        layers.append(nn.Conv2d(channels, width, 3, stride=stride, padding=1))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(width))
        elif norm is not None:
            raise ValueError(f"unknown norm {norm!r} (batch or None)")
        layers.append(nn.ReLU())
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
