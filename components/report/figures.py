"""The report's plots as PNG files: the score histogram with the thresholds drawn, and the
scores per defect type. Matplotlib (Agg) only; scores are normalised ones in [0, 1]."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

# One line style per threshold, in the order given (the chosen one is drawn thicker).
_STYLES = (("k", "--"), ("tab:red", ":"), ("tab:purple", "-."), ("tab:brown", "-"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_thresholds(ax, thresholds: Mapping[str, float], chosen: str | None) -> None:
    for (name, value), (colour, style) in zip(thresholds.items(), _STYLES * 4, strict=False):
        width = 2.2 if name == chosen else 1.0
        label = f"{name} = {value:.3f}" + (" (chosen)" if name == chosen else "")
        ax.axvline(value, color=colour, ls=style, lw=width, label=label)


def _save(plt, fig, ax, path: Path) -> Path:
    """Legend right of the axes, then the figure as a PNG at ``path``."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def score_histogram(path: Path, groups: Mapping[str, np.ndarray],
                    thresholds: Mapping[str, float], chosen: str | None = None,
                    title: str = "") -> Path:
    """Histograms of the normalised scores of each group (clipped to [0, 1]) with a
    vertical line per threshold; written to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    bins = np.linspace(0.0, 1.0, 41)
    for name, values in groups.items():
        values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
        if values.size:
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} ({values.size})")
    _draw_thresholds(ax, thresholds, chosen)
    ax.set(xlabel="normalised anomaly score (validation min-max, clipped to [0, 1])",
           ylabel="images", title=title or "Score distribution", xlim=(0.0, 1.0))
    return _save(plt, fig, ax, path)


def scores_by_type(path: Path, groups: Mapping[str, np.ndarray],
                   thresholds: Mapping[str, float], chosen: str | None = None) -> Path:
    """One row per type (e.g. ``good`` and each defect type): a box of its normalised
    scores with every image as a dot, and a vertical line per threshold."""
    plt = _pyplot()
    names = list(groups)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
    rng = np.random.default_rng(0)  # jitter only: the same picture for the same scores
    data = [np.clip(np.asarray(groups[n], dtype=np.float64), 0.0, 1.0) for n in names]
    ax.boxplot(data, orientation="horizontal", widths=0.5, showfliers=False)
    for row, values in enumerate(data, start=1):
        ax.scatter(values, row + rng.uniform(-0.15, 0.15, values.size), s=9, alpha=0.6)
    _draw_thresholds(ax, thresholds, chosen)
    ax.set_yticks(range(1, len(names) + 1), [f"{n} ({len(d)})" for n, d in zip(names, data,
                                                                               strict=True)])
    ax.invert_yaxis()  # the first type (normal images) on top
    ax.set(xlabel="normalised anomaly score (clipped to [0, 1])", xlim=(0.0, 1.0),
           title="Scores per type")
    return _save(plt, fig, ax, path)
