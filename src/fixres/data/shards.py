"""WebDataset shards: photos stored as members of tar files, each with its class in a ``.cls`` member.

``--data`` names shards as a brace pattern (``DIR/train-{000000..000127}.tar``), a glob, one ``.tar`` file, or a
folder of them. In a folder, shards named ``train*`` are the training split and ``val*`` / ``validation*`` the
evaluation split (``test*`` standing in for a missing one), as the folder layout's ``train/`` and ``val/``; a
folder without such names, or a pattern, is one split. A sample is the members sharing a key (the member's
name up to the first dot of its file name): one image (``.jpg``, ``.png``, ...) and its class, ``.cls``, an
integer (named by ``--class-map``, else by its number) or a class name. A sample without an image or a class
is left out, counted and named.

The shards are read in place: one pass over their tar headers records each photo's offset
(``fixres.data.sources``), and a photo is read by seeking to it, so JPEG's reduced decode applies as it does to
a file. Samples are ordered by class, then key, as a folder's photos are: the same photos give the same
numbers however they are sharded, and the same as in a folder whose file names are their keys.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fixres.data.folders import FolderIndex
from fixres.data.images import is_image_file
from fixres.data.labels import label_classes
from fixres.data.sources import PhotoUnreadable, keep_members, member_ref, scan_members
from fixres.errors import UsageError
from fixres.runtime.progress import status

SHARD_SUFFIX = ".tar"
#: Member suffix holding a sample's class.
CLASS_SUFFIX = ".cls"
#: Shard name prefixes of each split in a folder of shards, in the order they are looked for.
SPLIT_PREFIXES = {"train": ("train",), "val": ("val", "validation", "test")}
#: A numeric brace range, ``{000000..000127}``: zero-padded to the width of its first bound.
BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
#: Samples left out (no image or no class) named one by one before the rest are counted.
LEFT_OUT_NAMED = 5
BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


@dataclass(frozen=True)
class ShardSplit:
    """The shards of one split, in order, and the ``--data`` value they came from."""

    spec: str
    shards: tuple[str, ...]

    def __str__(self) -> str:
        return self.spec


def expand_braces(pattern: str) -> list[str]:
    """``a-{0..2}.tar`` -> a-0.tar, a-1.tar, a-2.tar (zero padding kept); ``{x,y}`` lists too."""
    found = [m for m in (BRACE_RANGE.search(pattern), BRACE_LIST.search(pattern)) if m is not None]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())  # the leftmost brace varies slowest, as in a shell
    head, tail = pattern[:match.start()], pattern[match.end():]
    if "," in match.group(0) and ".." not in match.group(0):
        parts = match.group(1).split(",")
    else:
        lo, hi = match.group(1), match.group(2)
        if int(hi) < int(lo):
            raise UsageError(f"shard pattern {pattern}: the range {match.group(0)} runs backwards")
        parts = [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]
    return [name for part in parts for name in expand_braces(head + part + tail)]


def is_shards(data: str | os.PathLike) -> bool:
    """True when ``data`` names tar shards: a pattern or file ending in ``.tar``, or a folder holding only shards."""
    text = os.fspath(data)
    if text.endswith(SHARD_SUFFIX):
        return True
    if not os.path.isdir(text):
        return False
    try:
        entries = [e for e in os.scandir(text) if not e.name.startswith(".")]
    except OSError:
        return False
    return any(e.name.endswith(SHARD_SUFFIX) and e.is_file() for e in entries) and not any(e.is_dir() for e in entries)


def _shards_of(spec: str) -> list[str]:
    names = [n for p in expand_braces(spec) for n in (sorted(glob.glob(p)) if glob.has_magic(p) else [p])]
    missing = [n for n in names if not os.path.isfile(n)]
    if missing or not names:
        raise UsageError(f"shard not found: {missing[0] if missing else spec}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [os.path.abspath(n) for n in names]


def resolve_shards(data: str | os.PathLike, split: str) -> ShardSplit:
    """The shards of ``split`` ("train" or "val") that ``data`` names (the module's rule)."""
    spec = os.fspath(data)
    if not os.path.isdir(spec):
        return ShardSplit(spec, tuple(_shards_of(spec)))
    every = sorted(e.name for e in os.scandir(spec) if e.name.endswith(SHARD_SUFFIX) and not e.name.startswith("."))
    named = {s: [n for n in every if n.startswith(prefixes)] for s, prefixes in
             (("train", SPLIT_PREFIXES["train"]),) + tuple((p, (p,)) for p in SPLIT_PREFIXES["val"])}
    val = next((named[p] for p in SPLIT_PREFIXES["val"] if named[p]), [])
    if not named["train"] and not val:
        chosen = every  # no split names: one split, as a plain ImageFolder root is
    elif split == "train" and not named["train"]:
        raise UsageError(f"{spec} has evaluation shards but no train* shards")
    else:
        chosen = named["train"] if split == "train" else (val or named["train"])
    return ShardSplit(os.path.join(spec, ""), tuple(os.path.join(os.path.abspath(spec), n) for n in chosen))


def key_of(member: str) -> tuple[str, str]:
    """(key, suffix): the member name up to the first dot of its file name, and the rest."""
    folder, name = os.path.split(member)
    stem, dot, rest = name.partition(".")
    return os.path.join(folder, stem), dot + rest


def image_suffix(suffixes) -> str | None:
    """The suffix of a sample's image member, given its members' (lower-case) suffixes: the first image suffix in
    sorted order; None without one."""
    return next((suffix for suffix in sorted(suffixes) if is_image_file("x" + suffix)), None)


def left_out_reason(suffixes) -> str | None:
    """Why a sample with these member suffixes is left out (no image, or no class), or None when it is complete."""
    if image_suffix(suffixes) is None:
        return "no image member"
    return None if CLASS_SUFFIX in suffixes else "no .cls member"


def members_by_key(names) -> dict[str, dict[str, str]]:
    """{key: {lower-case suffix: member name}} of a shard's member names (a sample is the members sharing a key)."""
    keys: dict[str, dict[str, str]] = {}
    for name in names:
        key, suffix = key_of(name)
        keys.setdefault(key, {})[suffix.lower()] = name
    return keys


def _samples_of(shard: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(key, image member ref, class text) of each complete sample of ``shard``, and (ref, reason) left out."""
    try:
        members = scan_members(shard)
    except PhotoUnreadable as exc:
        raise UsageError(str(exc)) from None
    kept, left, photos = [], [], []
    with open(shard, "rb") as f:
        for key, parts in members_by_key(members).items():
            reason = left_out_reason(parts)
            if reason is not None:
                left.append((member_ref(shard, key), reason))
                continue
            image = parts[image_suffix(parts)]
            offset, size = members[parts[CLASS_SUFFIX]]
            f.seek(offset)
            kept.append((key, member_ref(shard, image), f.read(size).decode("utf-8", "replace").strip()))
            photos.append(image)
    keep_members(shard, {name: members[name] for name in photos})
    return kept, left


def say_left_out(left: Sequence[tuple[str, str]], *, enabled: bool) -> None:
    """Warn of the samples left out (no image or no class): the first few by name, the rest counted."""
    for ref, reason in left[:LEFT_OUT_NAMED]:
        status(f"fixres: warning: left out {ref}: {reason}", enabled=enabled)
    if len(left) > LEFT_OUT_NAMED:
        status(f"fixres: warning: left out {len(left) - LEFT_OUT_NAMED} more samples without an image or a class",
               enabled=enabled)


def index_shards(split: ShardSplit, *, class_map: Sequence[str] | None = None, num_classes: int | None = None,
                 warn: bool = True) -> FolderIndex:
    """The samples of ``split``'s shards as a ``FolderIndex`` (labels from ``.cls``, classes as the module says)."""
    rows: list[tuple[str, str, str]] = []
    left: list[tuple[str, str]] = []
    status(f"fixres: reading the headers of {len(split.shards)} shard(s) in {split.spec}", enabled=warn)
    for shard in split.shards:
        kept, skipped = _samples_of(shard)
        rows += kept
        left += skipped
    if not rows:
        raise UsageError(f"{split.spec} holds no samples with an image and a .cls member")
    numbered = all(text.isdigit() for _, _, text in rows)
    classes, labels, source = label_classes([int(t) if numbered else t for _, _, t in rows], class_map=class_map,
                                            num_classes=num_classes, where=split.spec)
    order = sorted(range(len(rows)), key=lambda i: (labels[i], rows[i][0]))
    say_left_out(left, enabled=warn)
    return FolderIndex(root=Path(split.spec), classes=classes, samples=[(rows[i][1], labels[i]) for i in order],
                       source=f"{source} (shards)", skipped_folders=left)
