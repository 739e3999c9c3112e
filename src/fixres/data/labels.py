"""Class labels given as numbers or as names, as a shard's ``.cls`` member or a dataset's label column holds them:
the class names in index order and each sample's class index.

Numbers are class indices, named by the class map when one is given, else by the names that come with them (a
``ClassLabel`` column's), else by their numbers, as many as the model has outputs when that is known (a split
without the last classes keeps the model's numbering). Names follow the folder layout's rule (``folders.class_order``):
the class map's order, ImageNet's for wnids, else sorted.
"""

from __future__ import annotations

from typing import Sequence

from fixres.data.folders import class_order, refuse_more_classes
from fixres.errors import UsageError


def label_classes(values: Sequence[int | str], *, names: Sequence[str] | None = None,
                  class_map: Sequence[str] | None = None, num_classes: int | None = None,
                  where: str) -> tuple[list[str], list[int], str]:
    """(class names in index order, each value's class index, where the order comes from) of ``values``, all class
    indices or all class names; ``where`` names the data in an error."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        labels = [int(v) for v in values]
        if class_map is not None:
            classes, source = list(class_map), "class map"
        elif names:
            classes, source = list(names), "label names"
        else:  # numbers are the model's class indices: as many classes as it has outputs, when known
            count = num_classes if num_classes is not None else max(labels) + 1
            classes, source = [str(k) for k in range(count)], "class numbers"
        outside = [y for y in labels if not 0 <= y < len(classes)]
        if outside:
            raise UsageError(f"{where}: class {outside[0]} is outside the {len(classes)} classes of the {source}")
        refuse_more_classes(classes, num_classes)
        return classes, labels, source
    classes, source = class_order(sorted({str(v) for v in values}), class_map=class_map, num_classes=num_classes)
    at = {name: i for i, name in enumerate(classes)}
    return classes, [at[str(v)] for v in values], source
