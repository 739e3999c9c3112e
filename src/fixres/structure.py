"""Finding the parts FixRes adapts, by structure rather than by name (placeholder, see issue 4)."""

from __future__ import annotations

from torch import nn

from fixres.errors import FixresError


def find_classifier_name(model: nn.Module) -> str:
    """Name of the final classifier module (timm's get_classifier, else the last Linear)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, mod in model.named_modules():
            if mod is head:
                return name
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise FixresError(f"no classifier (Linear layer) found in {type(model).__name__}")
    return last
