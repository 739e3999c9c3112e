"""Progress bars and status lines on stderr (so ``--json`` output on stdout stays clean)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "img"):
    """A tqdm bar counting ``unit`` (images by default), showing the rate as images/s."""
    # disable=None: tqdm draws only on a terminal; a log (stderr redirected) gets the status lines alone
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True, leave=False,
                disable=None if enabled else True, file=sys.stderr, mininterval=0.5)


def status(message: str, *, enabled: bool = True) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


#: Below this many seconds a duration reads best in seconds, above it in minutes.
SECONDS_SHOWN_UP_TO = 120


def format_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < SECONDS_SHOWN_UP_TO else f"{seconds / 60:.1f} min"
