"""Drift of incoming images against the model's reference: pure numpy/scipy, no I/O.

The reference is fitted at evaluation on the **validation normals** (a seeded, held-out
share of the normal training images, never trained on): their raw scores, per-image
brightness (mean grey level, 0-255) and contrast (standard deviation of the grey levels)
at the model input, and the source sizes and band counts of the normal training images.
It travels inside the model file and beside ``metrics.json``.

A batch is compared with it by
  - the two-sample Kolmogorov-Smirnov test of the raw scores (``scipy.stats.ks_2samp``);
  - the population stability index on bins at the reference scores' quantiles,
    PSI = sum_i (p_i - q_i) ln(p_i / q_i), with empty bins floored at ``PSI_FLOOR``;
  - brightness and contrast shifts, the shares of sizes and band counts the training data
    never had, and the share flagged at the model's threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

REFERENCE_FORMAT = "nestad-monitoring-reference/1"
REPORT_FORMAT = "nestad-monitor-report/1"
PSI_FLOOR = 1e-4  # share given to an empty bin, so that ln(p / q) stays finite


def image_statistics(images: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-image brightness (mean) and contrast (std) of uint8 images (N, C, H, W), in
    grey levels 0-255 over every pixel and channel: two (N,) float64 arrays."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)  # (N, C*H*W)
    if x.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    return x.mean(axis=1), x.std(axis=1)


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "q05": float(np.quantile(v, 0.05)),
            "q50": float(np.quantile(v, 0.5)), "q95": float(np.quantile(v, 0.95))}


def build_reference(val_scores: np.ndarray, val_images: Any,
                    sizes: Iterable[tuple[int, int]], channels: Iterable[int],
                    threshold: float, which: str) -> dict[str, Any]:
    """The monitoring reference (plain JSON-able data) from validation normals.

    ``sizes`` are (width, height) of the normal training images' source files (unknown
    ones, 0, are left out); ``channels`` their band counts; ``threshold`` the model's (on
    the normalised score, ``which`` = fixed | fpr).
    """
    scores = np.sort(np.asarray(val_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no validation scores to build the monitoring reference on")
    lo, hi = float(scores[0]), float(scores[-1])
    brightness, contrast = image_statistics(val_images)
    known = [(int(w), int(h)) for w, h in sizes if int(w) > 0 and int(h) > 0]
    return {
        "format": REFERENCE_FORMAT,
        "reference": "validation normals (held-out normal training images); sizes and "
                     "band counts of the normal training images",
        "count": int(scores.size),
        "scores": scores.tolist(),  # raw scores A, sorted
        "threshold": {"which": which, "value": float(threshold),
                      "flagged_fraction": float(np.mean(
                          _normalised(scores, lo, hi) >= threshold))},
        "brightness": _summary(brightness),
        "contrast": _summary(contrast),
        "width": [min(w for w, _ in known), max(w for w, _ in known)] if known else None,
        "height": [min(h for _, h in known), max(h for _, h in known)] if known else None,
        "channels": sorted({int(c) for c in channels}),
    }


def _normalised(scores: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((scores - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def psi_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties merged): bins - 1 at most."""
    qs = np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def population_stability_index(reference: np.ndarray, new: np.ndarray, bins: int = 10) -> float:
    """PSI of ``new`` against ``reference`` on the reference's quantile bins (outer bins
    open-ended; a value on an edge goes to the bin above it)."""
    reference, new = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    if reference.size == 0 or new.size == 0:
        raise ValueError("PSI needs a non-empty reference and batch")
    edges = psi_edges(reference, bins)
    n_bins = len(edges) + 1

    def shares(values: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=n_bins)
        return np.maximum(counts / values.size, PSI_FLOOR)

    p, q = shares(new), shares(reference)
    return float(np.sum((p - q) * np.log(p / q)))


def ks_test(reference: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov (statistic, p-value), two-sided (scipy)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(new, np.float64), np.asarray(reference, np.float64))
    return float(result.statistic), float(result.pvalue)


def compare_batch(reference: dict[str, Any], scores: np.ndarray, flagged: np.ndarray,
                  images: Any, sizes: list[tuple[int, int]], channels: list[int],
                  psi_bins: int = 10) -> dict[str, Any]:
    """The monitoring figures of one batch (raw ``scores``, ``flagged`` at the model's
    threshold, uint8 ``images`` at the model input, source ``sizes`` and band counts)
    against ``reference``; ``components.decisions.should_retrain`` judges them."""
    ref_scores = np.asarray(reference["scores"], dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    n = int(scores.size)
    if n == 0:
        raise ValueError("no images in the batch")
    ks_stat, ks_p = ks_test(ref_scores, scores)
    brightness, contrast = image_statistics(images)
    ref_b, ref_c = reference["brightness"]["mean"], reference["contrast"]["mean"]
    width, height = reference.get("width"), reference.get("height")
    off_size = [not (width[0] <= w <= width[1] and height[0] <= h <= height[1])
                for w, h in sizes] if width and height else [False] * n
    known_channels = set(reference.get("channels") or [])
    off_channels = [c not in known_channels for c in channels] if known_channels else [False] * n
    seen_sizes = sorted({(int(w), int(h)) for w, h in sizes})
    return {
        "format": REPORT_FORMAT,
        "images": n,
        "reference_images": int(ref_scores.size),
        "score": {
            "ks_statistic": ks_stat,
            "ks_pvalue": ks_p,
            "psi": population_stability_index(ref_scores, scores, psi_bins),
            "psi_bins": psi_bins,
            "batch_median": float(np.median(scores)),
            "reference_median": float(np.median(ref_scores)),
        },
        "flagged": {
            "fraction": float(np.mean(np.asarray(flagged, dtype=bool))),
            "count": int(np.sum(np.asarray(flagged, dtype=bool))),
            "threshold": reference["threshold"]["value"],
            "which": reference["threshold"]["which"],
            "reference_fraction": reference["threshold"]["flagged_fraction"],
        },
        "image": {
            "brightness": {"batch_mean": float(brightness.mean()), "reference_mean": ref_b,
                           "shift": float(brightness.mean() - ref_b)},
            "contrast": {"batch_mean": float(contrast.mean()), "reference_mean": ref_c,
                         "change": float(contrast.mean() / max(ref_c, 1e-12) - 1.0)},
            "size_mismatch": float(np.mean(off_size)),
            "channel_mismatch": float(np.mean(off_channels)),
            "sizes_seen": [list(s) for s in seen_sizes[:20]],
            "reference_width": width,
            "reference_height": height,
            "channels_seen": sorted({int(c) for c in channels}),
            "reference_channels": sorted(known_channels),
        },
    }
