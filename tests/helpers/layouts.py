"""Generated photos written as WebDataset shards, and a tiny model whose predictions differ between photos."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch

CLASSES = ["class_0", "class_1", "class_2"]
#: The bytes of a photo that cannot be read (a counted skip).
BROKEN = b"not an image at all"
#: Samples per shard: unequal, so ranks and shards never line up.
SHARD_CUTS = (0.2, 0.7)


def write_shards(folder: Path, split: str, samples, *, names: bool = False) -> list[Path]:
    """``samples`` (path, label) as 3 tar shards ``SPLIT-00000K.tar`` of unequal size; keys ``CLASS/STEM``."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    cuts = [0, int(n * SHARD_CUTS[0]), int(n * SHARD_CUTS[1]), n]
    shards = []
    for k in range(3):
        shards.append(folder / f"{split}-{k:06d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for path, y in samples[cuts[k]:cuts[k + 1]]:
                key = f"{Path(path).parent.name}/{Path(path).stem}"
                label = CLASSES[y] if names else str(y)
                add_members(tar, [(key + Path(path).suffix, Path(path).read_bytes()), (key + ".cls", label.encode())])
    return shards


def training_shards(root: Path) -> Path:
    """``root/shards``: train shards of 6 photos per class plus one unreadable photo, the first shard also holding
    a sample without its class, and val shards of 2 per class (the photos also kept as folders in
    ``root/folder``)."""
    from helpers.folders import write_image_folder

    from fixres.data.folders import scan_folder
    write_image_folder(root / "folder" / "train", per_class=6, seed=1)
    (root / "folder" / "train" / "class_2" / "img_zzz.jpg").write_bytes(BROKEN)
    write_image_folder(root / "folder" / "val", per_class=2, seed=2)
    photos = scan_folder(root / "folder" / "train").samples
    train = write_shards(root / "shards", "train", photos)
    with tarfile.open(train[0], "a") as tar:  # a sample without its class: left out, and said
        add_members(tar, [("class_0/orphan.jpg", Path(photos[0][0]).read_bytes())])
    write_shards(root / "shards", "val", scan_folder(root / "folder" / "val").samples)
    return root / "shards"


def add_members(tar: tarfile.TarFile, members) -> None:
    """(name, bytes) pairs as regular files of ``tar``."""
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def spread_checkpoint(root: Path) -> Path:
    """A tiny 3-class model with a spread-out head, so predictions differ between photos."""
    from fixres.io.checkpoint import save_safetensors
    from fixres.models.loading import load_model
    torch.manual_seed(0)
    model = load_model(model="fixres_tiny_resnet", num_classes=3).model
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
    return save_safetensors(model.state_dict(), root / "tiny.safetensors")
