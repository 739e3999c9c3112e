"""The candidate sizes and the time they may take: stride multiples around the train size plus the
neighbours of the apparent-size recommendation, and the sizes whose estimated time fits the budget."""

from __future__ import annotations

import math
from typing import Sequence

#: Default candidates for selection after fixing: stride multiples from CANDIDATE_LOW x T to CANDIDATE_HIGH x T.
CANDIDATE_LOW = 0.5


CANDIDATE_HIGH = 2.0


def candidate_sizes(train_size: int, stride: int, *, recommended_unrounded: float | None = None,
                    low: float = CANDIDATE_LOW, high: float = CANDIDATE_HIGH) -> list[int]:
    """Stride multiples from about ``low`` x T to ``high`` x T, T itself, and the stride multiples
    just below and above the unrounded recommendation (so a recommendation that rounds back to T
    still puts its neighbours on the list)."""
    lo = max(stride, int(round(low * train_size / stride)) * stride)
    hi = max(lo, int(round(high * train_size / stride)) * stride)
    sizes = set(range(lo, hi + 1, stride)) | {int(train_size)}
    if recommended_unrounded:
        below = max(stride, int(math.floor(recommended_unrounded / stride)) * stride)
        sizes |= {below, below + stride}
    return sorted(sizes)


#: Share of a full forward that one cached fine-tuning epoch costs (only the adapted suffix runs,
#: forward and backward); used for the time estimate printed before the candidates run.
CACHED_EPOCH_SHARE = 0.2


#: A random-augmentation epoch runs the whole network forward and backward: about three forwards.
UNCACHED_EPOCH_SHARE = 3.0


def estimate_seconds(size: int, *, seconds_per_pixel: float, n_fit: int, n_scored: int, epochs: int,
                     cached: bool, read_s: float = 0.0, cached_share: float | None = None) -> float:
    """Rough time of one candidate: the prefix pass (or full epochs) over the fitting images, then
    scoring the held-out and validation images; the network's share scaled by the image area.

    ``read_s``: seconds to read and pre-process one image, which hardly depends on the size (decoding
    dominates); 0 when it is already inside ``seconds_per_pixel`` (both taken from one sweep's time).
    ``cached_share``: a cached epoch's share of a full forward measured on this model
    (``fixres.method.prefix.cached_step_share``), else ``CACHED_EPOCH_SHARE``.
    """
    share = (cached_share if cached_share is not None else CACHED_EPOCH_SHARE) if cached else UNCACHED_EPOCH_SHARE
    passes = n_fit * ((1.0 if cached else 0.0) + share * epochs) + n_scored
    reads = n_fit * (1 if cached else epochs) + n_scored
    return seconds_per_pixel * size * size * passes + read_s * reads


def fit_in_budget(sizes: Sequence[int], estimates: dict[int, float], budget_s: float | None,
                  keep: Sequence[int]) -> list[int]:
    """The sizes whose estimated total fits ``budget_s``: the ``keep`` sizes first, then the others
    nearest to them; the rest are dropped (and reported as such by the caller)."""
    if budget_s is None:
        return sorted(sizes)
    anchors = [k for k in keep if k in sizes] or list(sizes)[:1]
    order = sorted(sizes, key=lambda s: (s not in anchors, min(abs(s - a) for a in anchors), s))
    chosen, total = [], 0.0
    for s in order:
        if chosen and total + estimates[s] > budget_s:
            continue
        chosen.append(s)
        total += estimates[s]
    return sorted(chosen)
