"""Whether new data warrants retraining: a pure function, no I/O.

The retraining flow compares the dataset after an incremental ingestion with the data the
newest registered model was trained on. Ingestion only ever adds images, so the count of
normal training images (train + validation splits) tells how many new normal images
arrived; new test images or anomalous images alone do not change what the model learns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataState:
    """One data version as the decision sees it."""

    version: str | None  # the data version key (DVC md5 or manifest sha256)
    normal_train_images: int | None  # normal images in the train and val splits


@dataclass(frozen=True)
class RetrainDecision:
    """The verdict and why; ``new_normal_images`` is None when it could not be counted."""

    retrain: bool
    reason: str
    new_normal_images: int | None = None


def decide_retraining(
    current: DataState, trained: DataState | None, min_new_normal: int = 1
) -> RetrainDecision:
    """Retrain when no model was trained yet, or when the data version changed and at
    least ``min_new_normal`` normal training images were added (or the training data was
    replaced, or the count is unknown). Otherwise nothing new is worth a training run.
    """
    if min_new_normal < 1:
        raise ValueError(f"min_new_normal must be >= 1, got {min_new_normal}")
    if current.version is None:
        raise ValueError("the current data has no version (ingest it first)")
    if trained is None:
        return RetrainDecision(True, "no model has been trained yet")
    if trained.version == current.version:
        return RetrainDecision(
            False,
            f"nothing new: the newest model was trained on data version {current.version[:12]}",
            0,
        )
    if current.normal_train_images is None or trained.normal_train_images is None:
        return RetrainDecision(
            True,
            f"data version changed ({_short(trained.version)} -> "
            f"{current.version[:12]}); new normal images not countable",
        )
    new = current.normal_train_images - trained.normal_train_images
    if new < 0:
        return RetrainDecision(
            True,
            f"the training data was replaced ({-new} fewer normal "
            "images than the newest model was trained on)",
            new,
        )
    if new < min_new_normal:
        return RetrainDecision(
            False,
            f"nothing new to train on: the data changed but only "
            f"{new} new normal training images arrived (at least "
            f"{min_new_normal} needed)",
            new,
        )
    return RetrainDecision(
        True,
        f"{new} new normal training images (data version "
        f"{_short(trained.version)} -> {current.version[:12]})",
        new,
    )


def _short(version: str | None) -> str:
    return version[:12] if version else "unknown"
