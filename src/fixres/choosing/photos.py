"""Which photos choose the test size, never the validation photos the headline reports.

The size is chosen on a *held-out part of the training data* (``holdout_split``: a stratified, seeded share
of every class) only when ``fix`` trained the model without it (or the user says the model never saw it).
For a model trained elsewhere, on every training photo, those photos are memorised and would choose on
flattering numbers; the default is then two-fold cross-selection on the validation photos
(``stratified_halves``: choose on one half, report on the other, swap), or a separate labelled folder
(``--select-data``). Choosing on the reported photos flatters the result by the selection's own noise.
"""

from __future__ import annotations

import random
from typing import Sequence

from fixres.errors import UsageError

#: Share of every training class held out to choose the test size (never fitted, never reported).
HOLDOUT_FRACTION = 0.2


#: A class needs at least this many training images before one of them is held out.
MIN_CLASS_IMAGES_FOR_HOLDOUT = 2


HOLDOUT_METHOD = "held-out training images"


#: Which photos choose the size; each is named in the terminal, run.json and the report.
RULE_HELD_OUT = "held-out"              # fix trained the model without these training photos


RULE_UNTOUCHED = "held-out-untouched"   # the user says the model never trained on the held-out photos


RULE_SELECT_DATA = "select-data"        # a separate labelled folder


RULE_CROSS = "cross-val"                # two-fold cross-selection on the validation photos


CHOOSING_RULES = {
    RULE_HELD_OUT: "held-out training photos: fix trained the model without them",
    RULE_UNTOUCHED: "held-out training photos: you said (--holdout-untouched) the model never trained on them",
    RULE_SELECT_DATA: "a separate labelled folder (--select-data), not the validation photos reported",
    RULE_CROSS: ("two-fold cross-selection on the validation photos: the model was trained elsewhere, maybe on "
                 "every training photo, so held-out training photos would not be unseen; each half is reported by "
                 "the size chosen on the other half"),
}


def holdout_split(samples: Sequence[Sequence], *, fraction: float = HOLDOUT_FRACTION, seed: int = 0
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(fit, held_out): ``fraction`` of each class's images (at least one when the class has two), seeded.

    Both lists keep the input order; together they are exactly the input.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(int(label), []).append(i)
    held: set[int] = set()
    rng = random.Random(seed)
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < MIN_CLASS_IMAGES_FOR_HOLDOUT:
            continue
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        held.update(rng.sample(idx, k))
    fit = [(str(p), int(y)) for i, (p, y) in enumerate(samples) if i not in held]
    out = [(str(p), int(y)) for i, (p, y) in enumerate(samples) if i in held]
    return fit, out


def stratified_halves(labels: Sequence[int], *, seed: int = 0) -> list[int]:
    """Half 0 or 1 for every image: each class split as evenly as it goes (seeded, odd counts alternate)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    half = [0] * len(labels)
    rng = random.Random(seed)
    extra = 0  # which half gets the odd image of the next class with an odd count
    for label in sorted(by_class):
        idx = list(by_class[label])
        rng.shuffle(idx)
        k = len(idx) // 2 + (extra if len(idx) % 2 else 0)
        extra ^= len(idx) % 2
        for i in idx[k:]:
            half[i] = 1
    return half
