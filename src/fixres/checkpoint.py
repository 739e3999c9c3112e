"""Loading and saving weights safely: safetensors, or torch files with ``weights_only=True`` only.

A checkpoint from a stranger must never run code: pickles are only ever opened with
``torch.load(weights_only=True)``, whose unpickler refuses anything but tensors and plain
containers, and a refusal is reported as a one-line ``FixresError``. Nested layouts are unwrapped
(``model``, ``state_dict``, ``module.`` prefixes; the official FixRes release stores
``{'model': ...}`` with ``module.``). Saving is atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from fixres.atomic import atomic_path
from fixres.errors import FixresError, UsageError

SAFETENSORS_SUFFIXES = (".safetensors",)
#: Keys under which training scripts nest the weights, tried in this order.
NESTING_KEYS = ("model_ema", "state_dict_ema", "model", "state_dict", "net", "module")
PREFIXES = ("module.", "_orig_mod.", "model.")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} from a safetensors or torch file, never executing pickled code."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UsageError(f"checkpoint is not a file: {path}")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001
            text = str(exc).strip()
            raise FixresError(f"cannot read safetensors file {path}: "
                              f"{text.splitlines()[0] if text else type(exc).__name__}") from None
    obj = _torch_load_weights_only(path, failure=f"cannot read checkpoint {path}")
    return unwrap_state_dict(obj, source=str(path))


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header ``{"...``, whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def unwrap_state_dict(obj, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the weights inside common nestings and strip DataParallel/compile prefixes."""
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            key = next((k for k in NESTING_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if key is None:
                break
            obj = obj[key]
        else:
            break
    if not (isinstance(obj, Mapping) and obj):
        raise FixresError(f"{source}: no weights found (expected a state dict of tensors)")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise FixresError(f"{source}: no tensors found")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors atomically as safetensors (contiguous CPU copies; shared storage is cloned)."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
    return path


def save_training_state(state: dict, path: str | os.PathLike) -> Path:
    """Atomically save a resumable training state (tensors and plain Python values only).

    Loaded back with ``load_training_state`` (weights_only=True), so resuming never unpickles code.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))
    return path


def _torch_load_weights_only(path: Path, *, failure: str):
    """``torch.load(weights_only=True)``; a refused pickle or a broken file becomes a one-line FixresError.

    ``weights_only=True`` is passed explicitly, so even TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the
    environment cannot turn the safe unpickler off.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        if "weights_only" in text or "Weights only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise FixresError(
                f"refused to load {path}: it contains pickled Python objects that could run code "
                "(only tensors are accepted; convert it to safetensors where you trust it)") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise FixresError(f"{failure}: {first}") from None


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a state written by ``save_training_state``, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"nothing to resume: {path} does not exist")
    state = _torch_load_weights_only(path, failure=f"cannot resume from {path}")
    if not isinstance(state, dict):
        raise FixresError(f"cannot resume from {path}: not a training state")
    return state
