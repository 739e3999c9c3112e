"""Figures (matplotlib, Agg backend, PNG): one function per figure kind, each returns the path written."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fixres.atomic import atomic_path

FIG_DPI = 110


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=FIG_DPI, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return path


def plot_roc_areas(train_area: np.ndarray, test_area: np.ndarray, path: str | Path,
                   ratios: np.ndarray | None = None) -> Path:
    """Figure 2: RoC area as a fraction of the photo, train vs test (and the apparent-size ratio)."""
    plt = _pyplot()
    ncols = 2 if ratios is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6))
    axes = np.atleast_1d(axes)
    bins = np.linspace(0, 1, 51)
    ax = axes[0]
    ax.hist(train_area, bins=bins, density=True, alpha=0.6, label="train (RandomResizedCrop)")
    ax.hist(test_area, bins=bins, density=True, alpha=0.6, label="test (resize + centre crop)")
    ax.set_xlabel("RoC area / image area")
    ax.set_ylabel("density")
    ax.set_title("Regions of classification (fig. 2)")
    ax.legend(fontsize=8)
    if ratios is not None:
        ax = axes[1]
        ax.hist(ratios, bins=60, density=True, color="tab:green", alpha=0.75)
        ax.axvline(float(np.mean(ratios)), color="k", ls="--", label=f"mean {np.mean(ratios):.3f}")
        ax.axvline(1.0, color="tab:red", ls=":", label="equal size")
        ax.set_xlabel("apparent object size, test / train")
        ax.set_title("Apparent-size ratio (eq. 4)")
        ax.legend(fontsize=8)
    return _save(fig, path)
