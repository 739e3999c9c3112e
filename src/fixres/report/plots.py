"""Figures (matplotlib, Agg backend, PNG): one function per figure kind, each returns the path written."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fixres.choosing.significance import binomial_se
from fixres.io.atomic import atomic_path

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


def _se(row: dict, metric: str) -> float:
    """The error bar of one result row: its binomial standard error, from the row's count when an older result
    file lacks it (never the fold std, which is far smaller than the sampling noise)."""
    if row.get(f"{metric}_se") is not None:
        return float(row[f"{metric}_se"])
    n = row.get("n")
    return binomial_se(float(row[metric]), int(n)) if n else 0.0


def _caption(ax, text: str) -> None:
    """A line under the axes saying what the error bars are."""
    ax.annotate(text, xy=(0.0, -0.2), xycoords="axes fraction", fontsize=7, color="0.3", va="top")


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


def plot_accuracy_vs_size(series: dict, path: str | Path, *, marks: Sequence[tuple[int, str]] = (),
                          ensembles: Sequence[dict] = (), title: str | None = None,
                          metric: str = "top1") -> Path:
    """Figure 5 analogue: accuracy vs test size, one line per series, error bars = binomial standard error.

    ``series``: label -> result rows (dicts with test_size, ``metric`` and ``metric``_se), as
    ``fixres.method.evaluate`` returns them. ``marks``: vertical lines (size, label), e.g. the train size
    and the recommended test size. ``ensembles``: ensemble rows, drawn as points at their largest size.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["test_size"])
        if not rows:
            continue
        xs = [r["test_size"] for r in rows]
        ys = [r[metric] for r in rows]
        es = [_se(r, metric) for r in rows]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, label=label)
    for ens in ensembles:
        x = max(ens["test_sizes"])
        ax.errorbar([x], [ens[metric]], yerr=[_se(ens, metric)], marker="*", ms=10, capsize=3,
                    ls="none", label="ensemble " + "+".join(str(s) for s in ens["test_sizes"]))
    styles = ["--", ":", "-."]
    for i, (size, label) in enumerate(marks):
        ax.axvline(size, color="0.35", ls=styles[i % len(styles)], lw=1.2, label=f"{label} ({size})")
    ax.set_xlabel("test size (px)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title(title or "Accuracy vs test resolution")
    _caption(ax, "error bars: ± binomial standard error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_curves(curves: Sequence[dict], path: str | Path, *, train_size: int | None = None,
                         marks: Sequence[tuple[int, str]] = (), title: str = "Top-1 vs test size") -> Path:
    """Figure 5 style: top-1 (%) against test size, one line per curve, error bars = binomial standard error.

    Each curve is {"label", "test_sizes", "top1", "top1_se" (optional)}; ``marks`` draws vertical
    lines (size, label), e.g. the train size and the recommended test size.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for curve in curves:
        sizes = np.asarray(curve["test_sizes"], dtype=float)
        top1 = np.asarray(curve["top1"], dtype=float)
        se = curve.get("top1_se")
        ax.errorbar(sizes, top1, yerr=None if se is None else np.asarray(se, dtype=float), marker="o",
                    ms=4, capsize=3, lw=1.6, label=curve["label"], ls=curve.get("ls", "-"))
    styles = (":", "--", "-.")
    for k, (size, label) in enumerate(marks):
        ax.axvline(size, color="0.4", ls=styles[k % len(styles)], lw=1, label=label)
    if train_size is not None and not marks:
        ax.axvline(train_size, color="0.4", ls=":", lw=1, label=f"train size {train_size}")
    ax.set_xlabel("test size (px)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    if any(curve.get("top1_se") is not None for curve in curves):
        _caption(ax, "error bars: ± binomial standard error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grid_heatmap(train_sizes: Sequence[int], test_sizes: Sequence[int], top1, path: str | Path, *,
                      title: str = "Top-1 (%), train x test size (table 5)") -> Path:
    """Table 5 as a heatmap: rows test sizes, columns train sizes; the best test size per column is boxed."""
    plt = _pyplot()
    grid = np.asarray(top1, dtype=float)  # [test, train]
    fig, ax = plt.subplots(figsize=(1.3 + 1.1 * len(train_sizes), 1.0 + 0.45 * len(test_sizes)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="upper")
    ax.set_xticks(range(len(train_sizes)), [str(s) for s in train_sizes])
    ax.set_yticks(range(len(test_sizes)), [str(s) for s in test_sizes])
    ax.set_xlabel("train size")
    ax.set_ylabel("test size")
    span = np.nanmax(grid) - np.nanmin(grid) if np.isfinite(grid).any() else 1.0
    for j in range(grid.shape[1]):
        col = grid[:, j]
        best = int(np.nanargmax(col)) if np.isfinite(col).any() else -1
        for i in range(grid.shape[0]):
            if not np.isfinite(grid[i, j]):
                continue
            light = grid[i, j] < np.nanmin(grid) + 0.6 * span
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if light else "black", fontweight="bold" if i == best else "normal")
        if best >= 0:
            ax.add_patch(plt.Rectangle((j - 0.5, best - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="top-1 (%)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_activation_cdf_panels(panels: Sequence[dict], path: str | Path, *,
                               title: str = "Pooled activations (figs. 3-4)") -> Path:
    """Figures 3-4: CDFs of the pooled activations, one panel per state (e.g. before / after the fix).

    Each panel is {"title", "curves": [{"label", "x", "cdf"}]}.
    """
    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for curve in panel["curves"]:
            ax.plot(np.asarray(curve["x"], dtype=float), np.asarray(curve["cdf"], dtype=float), lw=1.5,
                    label=curve["label"])
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel("pooled activation value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("CDF")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_activation_cdfs(series: Sequence[dict], path: str | Path, *, title: str = "Pooled activations") -> Path:
    """Figures 3/4: CDF of the activations after global pooling, one line per test size.

    ``series``: [{"label", "x", "cdf", "style" ("-" or "--")}]; lines sharing a label prefix share a colour.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    colours: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for s in series:
        key = str(s["label"]).split(" ")[0]
        colour = colours.setdefault(key, cycle[len(colours) % len(cycle)])
        ax.plot(s["x"], s["cdf"], s.get("style", "-"), color=colour, label=s["label"], lw=1.4)
    if series and max(max(s["x"]) for s in series) >= 1.5:
        ax.axvline(2.0, color="0.6", ls=":", lw=1, label="2 (the paper's spread mark)")
    ax.set_xlabel("activation value after global pooling")
    ax.set_ylabel("cumulative fraction")
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_frechet_fit(values: np.ndarray, mu: float, sigma: float, xi: float, path: str | Path, *,
                     title: str = "Frechet fit (appendix A.1)") -> Path:
    """Figure 6: empirical CDF of the non-zero pooled activations and the fitted Frechet CDF."""
    plt = _pyplot()
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    v = v[v > 0]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if v.size:
        emp = (np.arange(v.size) + 0.5) / v.size
        ax.plot(v, emp, color="tab:blue", lw=2, label="empirical (zeros excluded)")
        z = np.clip(1.0 + xi / sigma * (v - mu), 1e-12, None)
        ax.plot(v, np.exp(-z ** (-1.0 / xi)), "--", color="tab:red", label=f"Frechet mu={mu:.3f} sigma={sigma:.3f}")
    ax.set_xlabel("activation value")
    ax.set_ylabel("CDF")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_stats(result: dict, path, *, compare: dict | None = None, title: str | None = None):
    """PNG of the CDFs (solid: ``result``; dashed: ``compare``, e.g. after adaptation) from a
    ``fixres.method.stats.activation_stats`` result."""
    series = [{"label": f"{r['test_size']}px", "x": r["cdf_x"], "cdf": r["cdf"], "style": "-"} for r in result["sizes"]]
    if compare is not None:
        series += [{"label": f"{r['test_size']}px (adapted)", "x": r["cdf_x"], "cdf": r["cdf"], "style": "--"}
                   for r in compare["sizes"]]
    title = title or "Pooled activations (fig. 3/4)"
    negative = max(r.get("frac_negative", 0.0) for r in result["sizes"] + list((compare or {}).get("sizes", [])))
    if negative > 0:  # token / LayerNorm models: the CDF starts below 0, nothing is dropped
        title += f"\n(pooled features can be negative: up to {100 * negative:.1f}% < 0; the x axis includes them)"
    return plot_activation_cdfs(series, path, title=title)
