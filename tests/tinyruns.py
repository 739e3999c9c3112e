"""Tiny runs for the method's tests (structure, finetune, adapt, stats, export): tiny data, a tiny model, fp32."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import write_image_folder


def fp32():
    from fixres.runtime.engine import Precision
    return Precision(False, None, False)


def tiny_data(root: Path, *, train_per_class: int = 6, val_per_class: int = 3):
    from fixres.data.folders import scan_folder
    write_image_folder(root / "train", per_class=train_per_class, seed=1)
    write_image_folder(root / "val", per_class=val_per_class, seed=2)
    return scan_folder(root / "train"), scan_folder(root / "val")


def tiny_bundle(seed: int = 0, *, train_size: int = 32, model: str = "fixres_tiny_resnet"):
    """``model`` (fixres_tiny_resnet by default) with 3 classes and random but not degenerate batch-norm weights
    and statistics (timm zero-inits the last norm of a block)."""
    from fixres.models.loading import load_model
    torch.manual_seed(seed)
    bundle = load_model(model=model, num_classes=3, train_size=train_size)
    with torch.no_grad():
        for m in bundle.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return bundle
