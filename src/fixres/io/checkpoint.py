"""Loading and saving weights safely: safetensors, or torch files with ``weights_only=True`` only.

A checkpoint from a stranger must never run code: pickles are only ever opened with
``torch.load(weights_only=True)``, whose unpickler refuses anything but tensors and plain
containers, and a refusal is reported as a one-line ``UsageError`` (bad input: exit 2). Exactly one
more type is allowed: ``argparse.Namespace``, which timm's ``train.py`` and torchvision's
``references/classification/train.py`` both pickle as ``args`` (timm itself allowlists it the same way);
it rebuilds a plain attribute bag and its values must still be tensors or plain containers.

Each format's own default is followed: torchvision's references store ``{'model', 'optimizer',
'lr_scheduler', 'epoch', 'args'[, 'model_ema']}`` and timm's ``{'epoch', 'arch', 'state_dict',
'optimizer', 'version', 'args'[, 'state_dict_ema']}``; the plain weights (``model`` / ``state_dict``)
load unless ``ema=True`` asks for the EMA copy (torchvision's ``AveragedModel`` counter
``n_averaged`` and its ``module.`` prefix are dropped). Other nestings are unwrapped too (``net``,
``module.`` prefixes; the official FixRes release stores ``{'model': ...}`` with ``module.``).
Weights holding NaN or infinity are named in a warning, or refused with ``strict=True``. Saving is atomic.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from fixres.errors import UsageError
from fixres.io.atomic import atomic_path

SAFETENSORS_SUFFIXES = (".safetensors",)
#: Keys under which training scripts nest the plain weights, tried in this order.
NESTING_KEYS = ("model", "state_dict", "net", "module")
#: Keys of the EMA copy: torchvision references (``model_ema``), timm train.py (``state_dict_ema``).
EMA_KEYS = ("model_ema", "state_dict_ema")
PREFIXES = ("module.", "_orig_mod.", "model.")
#: The counter torchvision's ``AveragedModel`` (its EMA wrapper) keeps beside the ``module.`` weights.
AVERAGED_COUNTER = "n_averaged"
#: The only non-container types a weights-only load may rebuild (the ``args`` of timm/torchvision training).
SAFE_GLOBALS = (argparse.Namespace,)
#: How a torch file starts: a zip archive (torch >= 1.6) or a pickle (protocol 2-5, the legacy format).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
PICKLE_PROTOCOLS = range(2, 6)
#: Names listed in a non-finite-weights message before "and N more".
NAMES_SHOWN = 5


def load_state_dict(path: str | os.PathLike, *, ema: bool = False, strict: bool = False) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} from a safetensors or torch file, never executing pickled code.

    ``ema``: take the EMA weights of a timm/torchvision training checkpoint. ``strict``: refuse
    weights holding NaN/inf (otherwise a warning names them).
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UsageError(f"checkpoint is not a file: {path}")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        if ema:
            raise UsageError(f"{path}: a safetensors file holds one set of weights; --ema is for training checkpoints")
        sd = _load_safetensors(path)
    else:
        obj = _torch_load_weights_only(path, failure=f"cannot read checkpoint {path}")
        sd = unwrap_state_dict(obj, source=str(path), ema=ema)
    check_finite(sd, source=str(path), strict=strict)
    return sd


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip()
        raise UsageError(f"cannot read safetensors file {path}: "
                         f"{text.splitlines()[0] if text else type(exc).__name__}") from None


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header ``{"...``, whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _looks_like_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError:
        return False
    return head == ZIP_MAGIC or (len(head) >= 2 and head[0] == PICKLE_PROTO and head[1] in PICKLE_PROTOCOLS)


#: The pickle protocol torch.save writes by default, the one its weights-only loader is made for.
TORCH_PICKLE_PROTOCOL = 2


def _pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of a torch file's object pickle (``data.pkl`` in a zip file, the file itself in the
    legacy format), from its PROTO opcode; None when it has none or cannot be read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                head = z.open(name).read(2) if name else b""
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    return head[1] if len(head) == 2 and head[0] == PICKLE_PROTO else None


def _is_flat(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _select_weights(obj, *, source: str, ema: bool):
    """The top-level entry a training checkpoint's own format loads by default (or its EMA copy)."""
    found_ema = [k for k in EMA_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)]
    if ema:
        if not found_ema:
            raise UsageError(f"{source}: --ema given but the checkpoint holds no EMA weights "
                             f"(looked for {', '.join(EMA_KEYS)})")
        return obj[found_ema[0]]
    if isinstance(obj, Mapping) and not _is_flat(obj) and found_ema and \
            not any(isinstance(obj.get(k), Mapping) for k in NESTING_KEYS):
        raise UsageError(f"{source}: holds only EMA weights ({found_ema[0]}); pass --ema to load them")
    return obj


def unwrap_state_dict(obj, *, source: str = "checkpoint", ema: bool = False) -> dict[str, torch.Tensor]:
    """Find the weights inside common nestings and strip DataParallel/compile/EMA-wrapper prefixes."""
    obj = _select_weights(obj, source=source, ema=ema)
    for _ in range(4):
        if _is_flat(obj) or not isinstance(obj, Mapping):
            break
        key = next((k for k in NESTING_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not (isinstance(obj, Mapping) and obj):
        raise UsageError(f"{source}: no weights found (expected a state dict of tensors)")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UsageError(f"{source}: no tensors found")
    if AVERAGED_COUNTER in sd and all(k.startswith("module.") for k in sd if k != AVERAGED_COUNTER):
        del sd[AVERAGED_COUNTER]
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [k for k, v in state_dict.items()
            if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]


def check_finite(state_dict: Mapping[str, torch.Tensor], *, source: str, strict: bool = False) -> list[str]:
    """Warn (one line on stderr) naming the tensors with NaN/inf, or refuse them when ``strict``."""
    bad = non_finite_tensors(state_dict)
    if bad:
        more = f" and {len(bad) - NAMES_SHOWN} more" if len(bad) > NAMES_SHOWN else ""
        text = f"{source}: {len(bad)} tensor(s) hold NaN or infinity: {', '.join(bad[:NAMES_SHOWN])}{more}"
        if strict:
            raise UsageError(f"{text} (refused under --strict)")
        print(f"fixres: warning: {text}; its outputs will not be numbers (--strict refuses such weights)",
              file=sys.stderr)
    return bad


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
    try:
        with atomic_path(path) as tmp:
            torch.save(state, str(tmp))
    except (OSError, RuntimeError) as exc:
        if not disk_full(exc):
            raise
        raise UsageError(f"the disk is full: no space left writing {path} (in {path.parent}); free space there "
                         "or choose another --out") from None
    return path


#: What torch's zip writer says when a write comes back short (a full disk, or a quota reached).
TORCH_WRITE_FAILURES = ("inline_container", "file write failed", "PytorchStreamWriter failed")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space: ENOSPC/EDQUOT, or torch's zip writer failing."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in TORCH_WRITE_FAILURES)


#: What torch's (legacy) loader raises on bytes that start like a pickle but are not one (random data).
BROKEN_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, IndexError, KeyError, struct.error, UnicodeDecodeError)
#: Words of torch's weights-only refusals that mean "this pickle wants to build objects" (code could run).
CODE_REFUSAL_MARKERS = ("Unsupported global", "GLOBAL", "Unsupported class", "is not an allowed global")


def _torch_load_weights_only(path: Path, *, failure: str):
    """``torch.load(weights_only=True)``; a refused pickle or a broken file becomes a one-line UsageError.

    ``weights_only=True`` is passed explicitly, so even TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the
    environment cannot turn the safe unpickler off. Only ``SAFE_GLOBALS`` are added, for this call alone.
    """
    if not _looks_like_torch_file(path):
        raise UsageError(f"{failure}: not a checkpoint (neither a torch file nor safetensors)")
    try:
        # torch warns about a pickle protocol other than its own; the failure, if any, is said below in one line
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        protocol = _pickle_protocol(path)
        if protocol is not None and protocol > TORCH_PICKLE_PROTOCOL and not any(m in text for m in
                                                                                CODE_REFUSAL_MARKERS):
            raise UsageError(
                f"{failure}: it is a pickle written with protocol {protocol} (torch.save(..., pickle_protocol="
                f"{protocol})), which the safe loader cannot read; re-save it with torch.save's default protocol "
                f"({TORCH_PICKLE_PROTOCOL}) or as safetensors") from None
        if any(marker in text for marker in CODE_REFUSAL_MARKERS):
            raise UsageError(
                f"refused to load {path}: it contains pickled Python objects that could run code "
                "(only tensors are accepted; convert it to safetensors where you trust it)") from None
        if ("Weights only load failed" in text or "WeightsUnpickler" in text
                or isinstance(exc, BROKEN_PICKLE_ERRORS)):
            raise UsageError(f"{failure}: not a checkpoint (a damaged or foreign pickle)") from None
        if "PytorchStreamReader" in text:
            raise UsageError(f"{failure}: not a checkpoint (a damaged or truncated torch zip file)") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise UsageError(f"{failure}: {first}") from None


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a state written by ``save_training_state``, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"nothing to resume: {path} does not exist")
    state = _torch_load_weights_only(path, failure=f"cannot resume from {path}")
    if not isinstance(state, dict):
        raise UsageError(f"cannot resume from {path}: not a training state")
    return state
