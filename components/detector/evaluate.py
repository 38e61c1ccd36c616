"""Evaluation: normalisation and thresholds from validation normals, metrics on the sealed test.

Leak-free protocol (nestad's):
  - the checkpoint was chosen on validation normals (training.py);
  - min, max and quantiles of the raw score A come from validation normals only;
    A' = (A - min) / (max - min), clipped to [0, 1];
  - thresholds: the paper's fixed 0.2 on A', and the one giving ``target_fpr`` on the
    validation normals (needs no labelled anomaly);
  - scores are computed in eval mode, independent of batch composition and order.
Paper-compatible protocol (reported beside it, labelled): A normalised with the *test*
set's min and max, F1/precision/recall at 0.2. AUROC and AUPRC do not change under a
monotone normalisation, so for one checkpoint the protocols differ in the thresholded
figures; the reference code's best-epoch-on-test choice is measured by
``benchmarks/paper_table.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from components.config import DataConfig, EvaluateConfig
from components.detector.map_metrics import pixel_auroc
from components.errors import DataError

LEAK_FREE = (
    "leak-free: checkpoint, score normalisation (min/max) and thresholds from validation "
    "normals only; eval-mode, order-independent scoring; test split used once, for these "
    "figures"
)
PAPER = (
    "paper-compatible: same checkpoint, scores min-max normalised over the test set, "
    "F1/precision/recall at the fixed threshold 0.2 (the reference code's choice)"
)


@dataclass(frozen=True)
class NormStats:
    """Raw-score statistics of validation normals; saved with the model."""

    score_min: float
    score_max: float
    quantiles: dict[str, float]
    count: int
    threshold_fixed: float  # on the normalised score
    threshold_fpr: float  # on the normalised score
    target_fpr: float

    def threshold(self, which: str) -> float:
        return self.threshold_fpr if which == "fpr" else self.threshold_fixed


def normalise(
    scores: np.ndarray, score_min: float, score_max: float, clip: bool = True
) -> np.ndarray:
    """(A - min) / (max - min), clipped to [0, 1] unless ``clip`` is False.

    Ranking metrics use the unclipped value: clipping ties every score beyond the fitted
    range and would understate AUROC/AUPRC. Flags at any threshold in (0, 1] are the same.
    """
    span = max(score_max - score_min, 1e-12)
    normed = (np.asarray(scores, dtype=np.float64) - score_min) / span
    return np.clip(normed, 0.0, 1.0) if clip else normed


def fit_normalisation(val_scores: np.ndarray, cfg: EvaluateConfig) -> NormStats:
    """Statistics and thresholds from validation-normal raw scores alone."""
    val_scores = np.asarray(val_scores, dtype=np.float64)
    if val_scores.size == 0:
        raise ValueError("no validation scores to fit the normalisation on")
    lo, hi = float(val_scores.min()), float(val_scores.max())
    quantiles = {f"q{q:g}": float(np.quantile(val_scores, q)) for q in cfg.quantiles}
    normed = np.sort(normalise(val_scores, lo, hi))
    # The smallest threshold (with ``>=``) that flags at most target_fpr of the validation
    # normals: just above the (k+1)-th largest. With fewer than 1/target_fpr images k is 0
    # and the threshold is 1.0, the validation maximum, which flags one image.
    k = int(np.floor(cfg.target_fpr * len(normed) + 1e-9))
    fpr_threshold = float(np.nextafter(normed[-k - 1], np.inf)) if k else 1.0
    return NormStats(
        lo, hi, quantiles, int(val_scores.size), cfg.fixed_threshold, fpr_threshold, cfg.target_fpr
    )


def classification_metrics(
    is_anomaly: np.ndarray, normed: np.ndarray, threshold: float
) -> dict[str, float]:
    """AUROC, AUPRC (anomaly = positive), and F1/precision/recall/FPR at ``threshold``."""
    y = np.asarray(is_anomaly).astype(int)
    pred = (normed >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, pred, average="binary", zero_division=0
    )
    negatives = max(int((y == 0).sum()), 1)
    both = len(np.unique(y)) == 2
    return {
        "auroc": float(roc_auc_score(y, normed)) if both else float("nan"),
        "auprc": float(average_precision_score(y, normed)) if both else float("nan"),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "fpr": float(((pred == 1) & (y == 0)).sum() / negatives),
        "threshold": float(threshold),
    }


@dataclass
class EvaluationReport:
    """Both protocols' figures, with what produced them."""

    leak_free: dict[str, Any]
    paper_compatible: dict[str, Any]
    norm: NormStats
    counts: dict[str, int]
    checkpoint_epoch: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "leak_free": self.leak_free,
            "paper_compatible": self.paper_compatible,
            "normalisation": asdict(self.norm),
            "counts": self.counts,
            "checkpoint_epoch": self.checkpoint_epoch,
            **self.extra,
        }


def require_both_classes(test_is_anomaly: np.ndarray, data: DataConfig | None = None) -> None:
    """Refuse a test split without normal or without anomalous images (``DataError`` naming
    the data source and the missing class): AUROC and AUPRC are undefined on one class, and
    a one-class F1 says nothing. Called before anything is scored or written."""
    y = np.asarray(test_is_anomaly).astype(int)
    normal, anomalous = int((y == 0).sum()), int((y == 1).sum())
    if normal and anomalous:
        return
    missing = "anomalous" if normal else "normal"
    where = f"{data.source}: the test split" if data else "the test split"
    hint = ""
    if data is not None and data.layout == "industrial":
        hint = " under test/<defect type>/" if missing == "anomalous" else " under test/good/"
    elif data is not None and data.layout == "classes":
        hint = (f" of the anomalous class {data.anomalous_class!r} under test/"
                if missing == "anomalous" else
                f" of a class other than {data.anomalous_class!r} under test/")
    raise DataError(f"{where} has no {missing} images ({normal} normal, {anomalous} "
                    f"anomalous); evaluation needs both classes: add {missing} test "
                    f"images{hint}")


def evaluate_scores(
    val_scores: np.ndarray,
    test_scores: np.ndarray,
    test_is_anomaly: np.ndarray,
    cfg: EvaluateConfig,
    checkpoint_epoch: int,
) -> EvaluationReport:
    """Fit on validation normals, measure on test, under both protocols (the test split
    must hold both classes: ``require_both_classes``)."""
    require_both_classes(test_is_anomaly)
    norm = fit_normalisation(val_scores, cfg)
    normed = normalise(test_scores, norm.score_min, norm.score_max, clip=False)
    chosen = classification_metrics(test_is_anomaly, normed, norm.threshold(cfg.threshold))
    leak_free = {
        "protocol": LEAK_FREE,
        **{k: chosen[k] for k in ("auroc", "auprc", "f1", "precision", "recall")},
        "threshold_used": cfg.threshold,
        "at_fixed_threshold": classification_metrics(test_is_anomaly, normed, norm.threshold_fixed),
        "at_target_fpr": classification_metrics(test_is_anomaly, normed, norm.threshold_fpr),
    }
    test_normed = normalise(test_scores, float(np.min(test_scores)), float(np.max(test_scores)))
    paper = {
        "protocol": PAPER,
        **classification_metrics(test_is_anomaly, test_normed, cfg.fixed_threshold),
    }
    y = np.asarray(test_is_anomaly).astype(int)
    counts = {
        "val_normal": int(len(val_scores)),
        "test_normal": int((y == 0).sum()),
        "test_anomalous": int((y == 1).sum()),
    }
    return EvaluationReport(leak_free, paper, norm, counts, checkpoint_epoch,
                            extra={"thresholds": threshold_table(val_scores, norm, cfg.threshold)})


def per_defect_figures(scores: np.ndarray, labels: list[str], is_anomaly: np.ndarray,
                       maps: np.ndarray | None = None, masks: np.ndarray | None = None
                       ) -> dict[str, dict[str, float | int]]:
    """Figures per defect type (anomalous label): its images against all test normals.

    ``image_auroc``: that type's scores against the normals'; ``pixel_auroc`` (when maps and
    masks are given and the type has a marked pixel): map values of that type's images and
    of the normal images against their masks. Reports which defects are found; it chooses
    nothing.
    """
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(is_anomaly, dtype=bool)
    names = np.asarray(labels)
    normal = ~y
    out: dict[str, dict[str, float | int]] = {}
    for name in sorted(set(names[y].tolist())):
        kind = y & (names == name)
        pick = kind | normal
        row: dict[str, float | int] = {"count": int(kind.sum())}
        row["image_auroc"] = (float(roc_auc_score(kind[pick], scores[pick]))
                              if normal.any() else float("nan"))
        if maps is not None and masks is not None and np.asarray(masks)[kind].any():
            row["pixel_auroc"] = pixel_auroc(np.asarray(maps)[pick], np.asarray(masks)[pick])
        out[name] = row
    return out


def threshold_table(val_scores: np.ndarray, norm: NormStats, used: str) -> dict[str, Any]:
    """Each threshold (on the normalised score) and the share of validation normals it
    flags: its false-positive rate on normal images, measured without any test data."""
    normed = normalise(val_scores, norm.score_min, norm.score_max)
    return {
        "used": used,
        **{which: {"value": norm.threshold(which),
                   "validation_normal_fpr": float(np.mean(normed >= norm.threshold(which)))}
           for which in ("fixed", "fpr")},
    }


def write_metrics(report: EvaluationReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------
# Plots (paper Figs. 6 and 7, plus ROC and PR curves)
# ----------------------------------------------------------------------------------------


def write_plots(
    out_dir: Path,
    is_anomaly: np.ndarray,
    normed: np.ndarray,
    norm: NormStats,
    inputs: np.ndarray | None = None,
    recons: np.ndarray | None = None,
    title: str = "",
) -> list[Path]:
    """ROC, PR, score histogram and input/reconstruction grid as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(is_anomaly).astype(int)
    clipped = np.clip(normed, 0.0, 1.0)  # the histogram shows the score users see
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    fpr, tpr, _ = roc_curve(y, normed)
    axes[0].plot(fpr, tpr, label=f"AUROC {roc_auc_score(y, normed):.3f}")
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    prec, rec, _ = precision_recall_curve(y, normed)
    axes[1].plot(rec, prec, label=f"AUPRC {average_precision_score(y, normed):.3f}")
    axes[1].axhline(y.mean(), color="k", ls="--", lw=0.8)
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
    for ax in axes:
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    written.append(out_dir / "roc_pr.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 51)
    ax.hist(clipped[y == 0], bins=bins, alpha=0.6, label="normal", density=True)
    ax.hist(clipped[y == 1], bins=bins, alpha=0.6, label="anomalous", density=True)
    ax.axvline(norm.threshold_fixed, color="k", ls="--", lw=1, label="fixed 0.2")
    ax.axvline(norm.threshold_fpr, color="r", ls=":", lw=1, label=f"FPR {norm.target_fpr:g} on val")
    ax.set(
        xlabel="normalised anomaly score (validation min-max)",
        ylabel="density",
        title=f"Score distribution {title}".strip(),
    )
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "score_histogram.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if inputs is not None and recons is not None and len(inputs):
        n = len(inputs)
        fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.5), squeeze=False)
        for i in range(n):
            for row, img in enumerate((inputs[i], recons[i])):
                ax = axes[row][i]
                ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0][0].set_ylabel("input")
        axes[1][0].set_ylabel("G(x)")
        fig.tight_layout()
        written.append(out_dir / "reconstructions.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
