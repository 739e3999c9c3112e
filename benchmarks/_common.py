"""What the benchmark scripts share: where the repository and the real photos are, the small generated data
set and tiny checkpoint their ``--quick`` modes use, and the small helpers every one of them needs (an atomic
JSON write, the size-list argument, the folder index, the default DataLoader workers, the noise statistics).

The benchmarks run against the installed package (``pip install -e .``: nothing puts src/ on the path) and
use its public API (``import fixres``). A benchmark that measures a library internal by design imports that
one module (``fixres.<room>.<module>``) and names it in its docstring on a line ``Internal: fixres.x.y``
saying why the public API does not serve (tests/house/test_benchmarks.py checks both). What several of them
need beyond the public API is re-exported here, each group saying who needs it and why. They never import
the test suite: the generated folders are written here (the same generator as tests/helpers/folders.py),
and the tiny checkpoint is made through the public API (``fixres.load``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

# Internal on purpose: what a benchmark shares with the product is the product's own code: its noise statistics
# (standard errors, p-values), its loader's worker count, its atomic JSON writer, its size-list parser and the
# coloured-square folders its tests and quick runs share. Beside them, the library pieces the benchmarks need
# beyond the public API and their one documented internal, kept in this one place so that a change inside the
# library is followed here, not in every script (who uses each, in brackets):
# - FixresError (fixres.errors), the library's error base class, which ``fixres`` does not export [timm_coverage];
# - fixres's loader and the pre-processing fixres eval and training feed the model (fixres.data.loaders,
#   fixres.data.transforms), whose tensors no public function returns [loader_speed, gpu_throughput's
#   loader-alone rate, fold_agreement's inputs];
# - the device and the precision fixres runs at (fixres.runtime), which ``finetune`` and the training take
#   [cost_table, transfer_flowers, calibration_label_free's fp32];
# - ``finetune`` (fixres.method.finetuning) with the switches ``fixres.finetune`` keeps fixed (the activation
#   cache on or off, no evaluation before, resuming from its folder, a given device and precision), returning
#   its full record (cache, timings) [cost_table, table5_grid, timm_coverage, transfer_flowers];
# - the parts FixRes finds in a network and adapts (fixres.models.structure, fixres.models.parts)
#   [timm_coverage per family, transfer_flowers for the layers --trainable trains];
# - the embedded data set generated in process (fixres.data.synth: what ``fixres make-dataset`` writes)
#   [cost_table, table5_grid];
# - the pooled activations and their KS distance to a reference (fixres.method.stats: ``fixres stats`` prints
#   them, the API returns none) [calibration_label_free --ks];
# - top-1 under corruptions, one pass per condition (fixres.method.robustness: what ``fix``'s robustness step
#   runs), at the precision ``fix`` evaluates at (fixres.runtime.engine) [fix_efficiency's unavoidable work].
from fixres.choosing.significance import binomial_se, paired_test, sign_p  # noqa: F401
from fixres.cli.args import int_list  # noqa: F401
from fixres.data.loaders import ImageDataset, default_workers, make_loader, pin_memory_for  # noqa: F401
from fixres.data.squares import write_image_folder  # noqa: F401
from fixres.data.synth import make_dataset  # noqa: F401
from fixres.data.transforms import MultiView, geometry_for, test_transform, train_transform  # noqa: F401
from fixres.errors import FixresError  # noqa: F401
from fixres.io.atomic import write_json  # noqa: F401
from fixres.method.finetuning import finetune  # noqa: F401
from fixres.method.robustness import corruption_table  # noqa: F401
from fixres.method.stats import activation_stats  # noqa: F401
from fixres.models.parts import select_parts  # noqa: F401
from fixres.models.structure import find_parts  # noqa: F401
from fixres.runtime.dist import DistEnv, resolve_device  # noqa: F401
from fixres.runtime.engine import inference_precision, precision_for  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
#: Real photos (see its README); FIXRES_SHARED_DATA points elsewhere.
SHARED = Path(os.environ.get("FIXRES_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_folder(name: str) -> Path | None:
    """SHARED/name, or None after saying on stderr that it is absent (the caller then measures nothing)."""
    path = SHARED / name
    if not path.is_dir():
        print(f"{name} not available ({path} is absent): nothing to measure", file=sys.stderr)
        return None
    return path


def photos_and_weights(data: str | os.PathLike, weights: str):
    """(model bundle of the registry ``weights``, ``data`` as a Path) for a benchmark on real photos,
    or None after printing why it measures nothing (the photos are absent, the weights not installed)."""
    data = Path(data)
    if not data.is_dir():
        print(f"skipped: real photos not available ({data} is absent)")
        return None
    import fixres
    try:
        return fixres.load(weights), data
    except Exception as exc:  # noqa: BLE001 - registry weights not installed
        print(f"skipped: {exc}")
        return None


def save_tiny_checkpoint(path: Path, *, num_classes: int = 3, seed: int = 0) -> Path:
    """Random weights of ``fixres_tiny_resnet`` (train size 32, seeded) as a safetensors file, through the
    public API: the checkpoint a --quick run fixes."""
    import torch
    from safetensors.torch import save_file

    import fixres
    torch.manual_seed(seed)
    bundle = fixres.load("fixres_tiny_resnet", num_classes=num_classes, train_size=32, random_init=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in bundle.model.state_dict().items()}, str(path))
    return Path(path)


def small_split(out: Path, *, val_per_class: int, classes: int = 3, train_per_class: int = 16) -> Path:
    """OUT/data/{train,val}: generated ImageFolders (coloured squares, :func:`write_image_folder`), for --quick
    runs."""
    root = out / "data"
    if not root.is_dir():
        write_image_folder(root / "train", classes=classes, per_class=train_per_class, seed=1)
        write_image_folder(root / "val", classes=classes, per_class=val_per_class, seed=2)
    return root


def spread_sample(samples, n: int) -> list:
    """``n`` samples spread evenly over the (class-sorted) list, so every part of the label space is used."""
    if n >= len(samples):
        return list(samples)
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)]


# --------------------------------------------------------------------------- helpers every benchmark shares

def split_index(data: str | os.PathLike, split: str = "val", *, classes: Sequence[str] | None = None):
    """The photos of ``split`` ("train" or "val": the root's train/ or val/ folder, else the root itself) as a
    ``FolderIndex`` (``.samples``: (path, label) pairs; ``.classes``), indexed as every fixres command indexes a
    folder (``fixres.api.as_index``): ImageNet wnid folders in the ImageNet order, other folders sorted, and a
    validation folder mapped onto ``classes`` (the training classes) by name when they are given."""
    from fixres.api import as_index
    return as_index(Path(data), split, classes=list(classes) if classes is not None else None)


def write_tar_shards(samples, classes: Sequence[str], folder: Path, split: str, shares: Sequence[float]) -> int:
    """``samples`` (path, label) as tar shards ``FOLDER/SPLIT-00000K.tar`` of unequal size (each of ``shares`` of
    the photos, the last shard the rest; keys ``CLASS/STEM``, ``.cls`` the class index); returns how many."""
    import io
    import tarfile
    folder.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    cuts = [0] + [int(n * sum(shares[:k + 1])) for k in range(len(shares))] + [n]
    for k in range(len(cuts) - 1):
        with tarfile.open(folder / f"{split}-{k:06d}.tar", "w") as tar:
            for path, y in samples[cuts[k]:cuts[k + 1]]:
                key = f"{classes[y]}/{Path(path).stem}"
                for suffix, data in ((Path(path).suffix, Path(path).read_bytes()), (".cls", str(y).encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return len(cuts) - 1


#: The three ways the stream benchmarks read the same shards: indexed, streamed, and through ``pipe:cat`` commands.
STREAM_LAYOUTS = ("shards", "stream", "pipe")


def stream_layouts(train, val, classes: Sequence[str], folder: Path, shares: Sequence[float], *,
                   val_classes: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``train`` and ``val`` (path, label; the labels index ``classes``, ``val_classes`` for val when given) written
    as ``train-*.tar`` (of ``shares``) and ``val-*.tar`` (of the first two shares) in ``folder``; the ``--data``
    flags that read them in each of ``STREAM_LAYOUTS``."""
    n_train = write_tar_shards(train, classes, folder, "train", shares)
    n_val = write_tar_shards(val, classes if val_classes is None else val_classes, folder, "val", shares[:2])
    return {"shards": ["--data", str(folder)], "stream": ["--data", str(folder), "--stream"],
            "pipe": ["--data", f"pipe:cat {folder}/train-{{{0:06d}..{n_train - 1:06d}}}.tar",
                     "--val-data", f"pipe:cat {folder}/val-{{{0:06d}..{n_val - 1:06d}}}.tar"]}


def rotated(items: Sequence, r: int) -> tuple:
    """``items`` starting at round ``r``'s place: each item leads a round in turn (a machine that slows as it warms
    favours none)."""
    k = r % len(items)
    return tuple(items[k:]) + tuple(items[:k])

