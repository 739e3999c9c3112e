"""fixres: fix the train-test resolution discrepancy of image classifiers (FixRes, NeurIPS 2019).

The Python API (``fixres.analyze``, ``fixres.sweep``, ``fixres.finetune``, ``fixres.adapt``, ``fixres.fix``,
``fixres.load``, ``fixres.export``) lives in ``fixres.api``. It is loaded on first use, so ``import fixres``
stays light: torch is only imported by the modules that need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fixres.version import __version__  # noqa: F401 - re-exported

#: Public names, each served from ``fixres.api`` on first access.
__all__ = ["analyze", "sweep", "finetune", "adapt", "fix", "load", "export",
           "Analysis", "SizeResult", "SweepResult", "AdaptResult", "FixResult", "DataConfig", "ModelBundle"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve lazily below
    from fixres.api import (
        AdaptResult,
        Analysis,
        DataConfig,
        FixResult,
        ModelBundle,
        SizeResult,
        SweepResult,
        adapt,
        analyze,
        export,
        finetune,
        fix,
        load,
        sweep,
    )


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module("fixres.api"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'fixres' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
