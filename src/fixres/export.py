"""Exporting a fixed model: ``model.safetensors`` plus ``fixres.json`` beside it (and optionally ONNX at S).

``fixres.json`` says everything needed to use the model without flags: the model name, the classes,
the test size it was fixed for, the pre-processing (crop ratio, mean, std, interpolation), the train
size it came from and the accuracy measured; plus timm's pretrained_cfg keys (``input_size``,
``test_input_size``, ``crop_pct``, ``test_crop_pct``) so timm users read it too. ``models.load_model``
reads it back (``fixres eval --checkpoint DIR/model.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fixres import __version__
from fixres.atomic import write_json
from fixres.checkpoint import save_safetensors
from fixres.config import DataConfig, validate_size
from fixres.errors import FixresError, UsageError

WEIGHTS_NAME = "model.safetensors"
META_NAME = "fixres.json"
ONNX_NAME = "model.onnx"
ONNX_OPSET = 17


def export_meta(*, model_name: str, cfg: DataConfig, test_size: int, train_size: int, num_classes: int,
                class_names: Sequence[str] | None, accuracy: dict | float | None, extra: dict | None = None) -> dict:
    """The content of fixres.json (fixres keys + timm pretrained_cfg keys)."""
    validate_size(test_size, "test_size")
    validate_size(train_size, "train_size")
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f"{len(class_names)} class names for a model with {num_classes} outputs")
    meta = {
        "format": "fixres-export-1",
        "fixres_version": __version__,
        "model": model_name,
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names is not None else None,
        "train_size": int(train_size),
        "test_size": int(test_size),
        "crop_ratio": float(cfg.crop_ratio),
        "mean": [float(v) for v in cfg.mean],
        "std": [float(v) for v in cfg.std],
        "interpolation": cfg.interpolation,
        "accuracy": accuracy,
        # timm pretrained_cfg keys
        "input_size": [3, int(train_size), int(train_size)],
        "test_input_size": [3, int(test_size), int(test_size)],
        "crop_pct": float(cfg.crop_ratio),
        "test_crop_pct": float(cfg.crop_ratio),
    }
    if extra:
        meta.update(extra)
    return meta


def export_model(model: nn.Module, out_dir: str | Path, *, model_name: str, cfg: DataConfig, test_size: int,
                 train_size: int | None = None, class_names: Sequence[str] | None = None,
                 accuracy: dict | float | None = None, extra: dict | None = None, onnx: bool = False) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/fixres.json``; returns the safetensors path.

    ``onnx=True`` also writes ``model.onnx`` at test_size when the ``onnx`` package is installed
    (otherwise the result's ``onnx`` entry in fixres.json says why it was skipped).
    """
    from fixres.adapt import equalization_of
    from fixres.models import num_outputs
    if equalization_of(model) is not None:
        raise UsageError("the Frechet equalisation is a hook after the pooling, not part of the weights, so it "
                         "cannot be exported; export a fine-tuned, bn-recalibrate or gaussian model instead")
    out_dir = Path(out_dir)
    train_size = int(train_size or cfg.train_size)
    class_names = list(class_names) if class_names is not None else (
        list(cfg.class_names) if cfg.class_names is not None else None)
    n = num_outputs(model)
    meta = export_meta(model_name=model_name, cfg=cfg, test_size=test_size, train_size=train_size, num_classes=n,
                       class_names=class_names, accuracy=accuracy, extra=extra)
    sd = {k: v for k, v in model.state_dict().items()}
    path = save_safetensors(sd, out_dir / WEIGHTS_NAME,
                            metadata={"format": "pt", "fixres": json.dumps({k: meta[k] for k in (
                                "model", "num_classes", "train_size", "test_size", "crop_ratio")})})
    if onnx:
        meta["onnx"] = _export_onnx(model, out_dir / ONNX_NAME, test_size)
    write_json(out_dir / META_NAME, meta)
    return path


def _export_onnx(model: nn.Module, path: Path, test_size: int) -> dict:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return {"written": False, "reason": "the onnx package is not installed (pip install 'fixres[onnx]')"}
    from fixres.atomic import atomic_path
    was = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(1, 3, test_size, test_size, device=p.device, dtype=p.dtype)
    try:
        with atomic_path(path) as tmp, torch.no_grad():
            torch.onnx.export(model, (x,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET)
    except Exception as exc:  # noqa: BLE001 - exporter failures are many and model-specific
        raise FixresError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    finally:
        model.train(was)
    return {"written": True, "path": str(path), "input_size": [1, 3, test_size, test_size]}
