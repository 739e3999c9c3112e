"""Exporting a fixed model: ``model.safetensors`` plus ``fixres.json`` beside it, ``config.json`` for timm
(``fixres.models.hub``), ``USAGE.md`` with timm and torchvision snippets, ``README.md``, the model card the
Hugging Face hub renders (``fixres.models.card``), and optionally ONNX at S.

What ``fixres.json`` holds, its schema and how it is read back live in ``fixres.io.meta`` (re-exported
here: ``from fixres.models.export import WEIGHTS_NAME`` keeps working). ``models.load_model`` reads an export
back (``fixres eval --checkpoint DIR/model.safetensors``).

An export is replaced as a whole or not at all: every file is written to a hidden staging folder inside
the target folder, and only once all are complete are they swapped in by renames (``io.atomic.swap_in``:
old files aside, new ones in, old ones removed). A failure while writing (a full disk) leaves the previous
export complete and loadable; the safetensors header also carries the complete metadata.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fixres.config import DataConfig, validate_size
from fixres.data.transforms import geometry_for, torchvision_transform_code
from fixres.errors import FixresError, UsageError
from fixres.io.atomic import atomic_path, remove_stale_folders, swap_in, write_text
from fixres.io.checkpoint import save_safetensors
from fixres.io.meta import (  # noqa: F401 - re-exported
    META_NAME,
    ONNX_NAME,
    WEIGHTS_NAME,
    build_meta,
    header_metadata,
    read_export_meta,
    read_meta_file,
    write_meta,
)
from fixres.models.card import CARD_NAME, CardFacts, card_text
from fixres.models.hooks import kept_hook
from fixres.models.hub import CONFIG_NAME, write_timm_config
from fixres.models.loading import export_model_kwargs, num_outputs

#: ONNX opset written (18: what torch's exporter produces natively, so no down-conversion pass runs).
ONNX_OPSET = 18
#: The generated serving notes beside an export (timm, torchvision and fixres snippets).
USAGE_NAME = "USAGE.md"
ONNX_EXAMPLE_BATCH = 2
#: Every file an export consists of: replaced together, removed together.
EXPORT_FILES = (WEIGHTS_NAME, META_NAME, CONFIG_NAME, USAGE_NAME, CARD_NAME, ONNX_NAME)
#: Prefix of the hidden folder an export is written to before it is swapped in.
STAGING_PREFIX = ".export.partial-"


def export_meta(*, model_name: str, cfg: DataConfig, test_size: int, train_size: int, num_classes: int,
                class_names: Sequence[str] | None, accuracy: dict | float | None, extra: dict | None = None) -> dict:
    """The content of fixres.json (``fixres.io.meta.build_meta`` after checking the sizes)."""
    validate_size(test_size, "test_size")
    validate_size(train_size, "train_size")
    return build_meta(model_name=model_name, cfg=cfg, test_size=test_size, train_size=train_size,
                      num_classes=num_classes, class_names=class_names, accuracy=accuracy, extra=extra)


def export_model(model: nn.Module, out_dir: str | Path, *, model_name: str, cfg: DataConfig, test_size: int,
                 train_size: int | None = None, class_names: Sequence[str] | None = None,
                 accuracy: dict | float | None = None, extra: dict | None = None, onnx: bool = False,
                 card: CardFacts | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/fixres.json``; returns the safetensors path.

    ``onnx=True`` also writes ``model.onnx`` at test_size when the ``onnx`` package is installed
    (otherwise the result's ``onnx`` entry in fixres.json says why it was skipped). ``card``: what the model card
    says beyond the metadata (the photos the accuracy was measured on, the command, the licence).
    """
    kept = kept_hook(model)
    if kept is not None:  # e.g. the Frechet equalisation: a map after the pooling the weights cannot carry
        raise UsageError(kept.not_in_weights)
    out_dir = Path(out_dir)
    train_size = int(train_size or cfg.train_size)
    class_names = list(class_names) if class_names is not None else (
        list(cfg.class_names) if cfg.class_names is not None else None)
    kwargs = export_model_kwargs(model)  # what a loader must pass to rebuild it as it is (a fixed size moved)
    if kwargs and "model_kwargs" not in (extra or {}):
        extra = {**(extra or {}), "model_kwargs": kwargs}
    meta = export_meta(model_name=model_name, cfg=cfg, test_size=test_size, train_size=train_size,
                       num_classes=num_outputs(model), class_names=class_names, accuracy=accuracy, extra=extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(out_dir, (STAGING_PREFIX,))  # what a killed export left: never published
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        if onnx:
            meta["onnx"] = _export_onnx(model, staging / ONNX_NAME, test_size, final=out_dir / ONNX_NAME)
        save_safetensors(model.state_dict(), staging / WEIGHTS_NAME, metadata=header_metadata(meta))
        write_meta(staging, meta)
        timm_config = write_timm_config(staging, model, meta)
        write_text(staging / USAGE_NAME, usage_text(meta, cfg, timm_ready=timm_config is not None))
        write_text(staging / CARD_NAME, card_text(meta, cfg, card, timm_ready=timm_config is not None))
        swap_in(staging, out_dir, EXPORT_FILES)  # only now does the old export go
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / WEIGHTS_NAME


def write_card(out_dir: str | Path, cfg: DataConfig, card: CardFacts) -> Path:
    """Rewrite the model card of the export in ``out_dir`` with ``card`` (what only the caller knows: the data,
    the command), from the export's own ``fixres.json``; the rest of the export is left as it is."""
    out_dir = Path(out_dir)
    meta = read_meta_file(out_dir / META_NAME)
    path = out_dir / CARD_NAME
    write_text(path, card_text(meta, cfg, card, timm_ready=(out_dir / CONFIG_NAME).is_file()))
    return path


def remove_export(out_dir: str | Path) -> list[str]:
    """Remove the export in ``out_dir``, all its files (a result that exports nothing replaces one); the names
    removed."""
    removed = []
    for name in EXPORT_FILES:
        path = Path(out_dir) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def usage_text(meta: dict, cfg: DataConfig, *, timm_ready: bool) -> str:
    """USAGE.md of an export: how to run the fixed model with timm, with torchvision, and with fixres."""
    size = int(meta["test_size"])
    geometry = geometry_for(size, cfg, float(meta["crop_ratio"]))
    lines = [f"# {meta['model']}, fixed at {size} px",
             "",
             f"Trained at {meta['train_size']} px and fixed at {size} px by fixres {meta['fixres_version']}: "
             f"resize the shorter side to {geometry.resize} px ({meta['interpolation']}), centre-crop "
             f"{size} px, normalise with mean {meta['mean']} and std {meta['std']}.",
             ""]
    if timm_ready:
        lines += ["## timm", "", "```python", "import timm",
                  'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True).eval()',
                  "cfg = timm.data.resolve_data_config({}, model=model, use_test_size=True)",
                  "transform = timm.data.create_transform(**cfg)", "```", ""]
    lines += ["## torchvision", "", "```python", "import torch",
              "from torchvision.transforms import InterpolationMode, v2", "",
              "transform = " + torchvision_transform_code(geometry, cfg), "```", "",
              "## fixres", "", "```python", "import fixres", 'bundle = fixres.load("PATH_TO_THIS_FOLDER")',
              "model, transform = bundle.model.eval(), bundle.transform", "```", ""]
    return "\n".join(lines)


def _export_onnx(model: nn.Module, path: Path, test_size: int, *, final: Path) -> dict:
    try:
        write_onnx(model, path, test_size)
    except ImportError:
        return {"written": False, "reason": "the onnx and onnxscript packages are not installed "
                                            "(pip install 'fixres[onnx]')"}
    return {"written": True, "path": str(final), "input_size": [1, 3, test_size, test_size], "opset": ONNX_OPSET}


def write_onnx(model: nn.Module, path: Path, size: int) -> None:
    """``model`` as ONNX at ``size`` (input "input", output "logits", any batch), written atomically; ImportError
    without the onnx packages, one-line FixresError when the exporter fails."""
    import onnx  # noqa: F401
    import onnxscript  # noqa: F401 - torch's exporter needs it
    was = model.training
    model.eval()
    p = next(model.parameters())
    # two images: an example batch of 1 would make the exporter specialise the batch axis to 1
    x = torch.zeros(ONNX_EXAMPLE_BATCH, 3, size, size, device=p.device, dtype=p.dtype)
    try:
        with atomic_path(path) as tmp, torch.no_grad():
            torch.onnx.export(model, (x,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=ONNX_OPSET,
                              external_data=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - exporter failures are many and model-specific
        raise FixresError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    finally:
        model.train(was)
