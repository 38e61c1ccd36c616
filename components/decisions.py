"""Pure decisions, no I/O and no MLflow: whether a version may be promoted, whether new
data warrants retraining. The flows and ``components.registry.promote`` apply them.

Promotion: a registered version moves through three aliases, ``candidate`` -> ``staging``
-> ``production``. The automatic gate promotes a candidate to production only when it
beats the current production version on the *same evaluation data* (the same images,
labels and data version) by more than a margin on one metric. Figures measured on
different test sets are not comparable, so the gate refuses them rather than guess.

Retraining: the retraining flow compares the dataset after an incremental ingestion with
the data the newest registered model was trained on. Ingestion only ever adds images, so
the count of normal training images (train + validation splits) tells how many new
normal images arrived; new test images or anomalous images alone do not change what the
model learns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# ----------------------------------------------------------------------------------------
# Promotion
# ----------------------------------------------------------------------------------------

CANDIDATE, STAGING, PRODUCTION = "candidate", "staging", "production"
STAGES = (CANDIDATE, STAGING, PRODUCTION)
# The alias a version must hold before it may move to each stage (without --force).
_REQUIRED_BEFORE = {STAGING: CANDIDATE, PRODUCTION: STAGING}


@dataclass(frozen=True)
class VersionFigures:
    """What the gate knows about one registered version."""

    version: str
    metrics: Mapping[str, float]
    eval_data_version: str | None  # digest of the evaluation images, labels and data version


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the figures it compared (recorded in version tags)."""

    promote: bool
    reason: str
    metric: str
    margin: float
    higher_is_better: bool
    candidate_value: float | None = None
    production_value: float | None = None
    production_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def decide_promotion(
    candidate: VersionFigures,
    production: VersionFigures | None,
    metric: str,
    margin: float = 0.0,
    higher_is_better: bool = True,
) -> GateDecision:
    """Promote ``candidate`` over ``production`` only if it is better by more than ``margin``.

    Refuses when the candidate is already production, a figure is missing or not finite,
    or the two were evaluated on different (or unknown) evaluation data. With no
    production version yet, a candidate with a finite figure is promoted.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")

    def verdict(
        promote: bool, reason: str, cand: float | None = None, prod: float | None = None
    ) -> GateDecision:
        return GateDecision(
            promote,
            reason,
            metric,
            margin,
            higher_is_better,
            cand,
            prod,
            production.version if production else None,
        )

    cand = _finite(candidate.metrics, metric)
    if production is not None and candidate.version == production.version:
        return verdict(False, f"version {candidate.version} is already production", cand, cand)
    if cand is None:
        return verdict(False, f"candidate version {candidate.version} has no finite {metric}")
    if production is None:
        return verdict(True, "no production version yet", cand)
    prod = _finite(production.metrics, metric)
    if not candidate.eval_data_version or not production.eval_data_version:
        return verdict(
            False,
            "the evaluation data version of "
            f"{'the candidate' if not candidate.eval_data_version else 'production'} "
            "is unknown, so the figures are not comparable",
            cand,
            prod,
        )
    if candidate.eval_data_version != production.eval_data_version:
        return verdict(
            False,
            f"evaluated on different data (candidate "
            f"{candidate.eval_data_version[:12]}, production "
            f"{production.eval_data_version[:12]}), so the figures are not "
            "comparable",
            cand,
            prod,
        )
    if prod is None:
        return verdict(
            False, f"production version {production.version} has no finite {metric}", cand
        )
    improvement = cand - prod if higher_is_better else prod - cand
    better = "higher" if higher_is_better else "lower"
    if improvement > margin:
        return verdict(
            True,
            f"{metric} {cand:.6g} vs {prod:.6g}: {better} by {improvement:.6g} > margin {margin:g}",
            cand,
            prod,
        )
    return verdict(
        False,
        f"{metric} {cand:.6g} vs {prod:.6g}: not {better} by more than margin {margin:g}",
        cand,
        prod,
    )


def check_transition(
    target: str, holds: frozenset[str] | set[str], force: bool = False
) -> str | None:
    """Why a version holding aliases ``holds`` may not move to ``target``; None if it may.

    ``staging`` needs ``candidate``, ``production`` needs ``staging``; ``force`` skips the
    order (never an unknown stage).
    """
    if target not in STAGES:
        return f"unknown stage {target!r} (stages: {', '.join(STAGES)})"
    if target in holds:
        return f"it is already {target}"
    required = _REQUIRED_BEFORE.get(target)
    if force or required is None or required in holds:
        return None
    held = ", ".join(sorted(holds)) or "no alias"
    return f"it must be {required} before {target} (it holds: {held}); use --force to skip a stage"


# ----------------------------------------------------------------------------------------
# Retraining
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Monitoring: does a batch of incoming images call for retraining?
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftVerdict:
    """Whether a monitored batch drifted past its limits, and which (``monitor.*`` keys)."""

    retrain: bool
    exceeded: tuple[str, ...]  # the limits' keys, e.g. ("min_ks_pvalue", "max_psi")
    reasons: tuple[str, ...]  # one line per exceeded limit, naming figure and limit

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "every figure within its limits"


def should_retrain(report: Mapping[str, Any], limits: Any) -> DriftVerdict:
    """Judge a monitoring report (``components.detector.drift.compare_batch``) against
    ``limits`` (a ``MonitorConfig``). A figure that is missing or not finite counts as
    exceeded: a check that could not be made never passes silently."""
    image = report.get("image", {})
    checks = [  # (limit key, figure name, value, passes if ...)
        ("min_ks_pvalue", "score KS p-value", report.get("score", {}).get("ks_pvalue"), ">="),
        ("max_psi", "score PSI", report.get("score", {}).get("psi"), "<="),
        ("max_flagged_fraction", "flagged fraction", report.get("flagged", {}).get("fraction"),
         "<="),
        ("max_brightness_shift", "|brightness shift|",
         _abs(image.get("brightness", {}).get("shift")), "<="),
        ("max_contrast_change", "|contrast change|",
         _abs(image.get("contrast", {}).get("change")), "<="),
        ("max_size_mismatch", "size mismatch", image.get("size_mismatch"), "<="),
        ("max_channel_mismatch", "channel mismatch", image.get("channel_mismatch"), "<="),
    ]
    exceeded, reasons = [], []
    for key, figure, value, passes in checks:
        limit = float(getattr(limits, key))
        finite = value is not None and math.isfinite(float(value))
        ok = finite and (float(value) >= limit if passes == ">=" else float(value) <= limit)
        if not ok:
            exceeded.append(key)
            shown = f"{float(value):.4g}" if finite else "not measured"
            side = "<" if passes == ">=" else ">"
            reasons.append(f"{figure} {shown} {side if finite else 'vs'} monitor.{key}={limit:g}")
    return DriftVerdict(bool(exceeded), tuple(exceeded), tuple(reasons))


def _abs(value: Any) -> float | None:
    return None if value is None else abs(float(value))


def decide_retraining_on_drift(
    current: DataState, trained: DataState | None, min_new_normal: int,
    drift: DriftVerdict | None,
) -> RetrainDecision:
    """``decide_retraining`` with a monitoring verdict as a trigger. Drift lowers the bar to
    one new normal training image (normal images of the drifted batch, once inspected and
    ingested); with none, retraining on the old data cannot fix drift, so it does not
    retrain and says what is missing. No drift (or no verdict): ``decide_retraining``."""
    if drift is None or not drift.retrain:
        return decide_retraining(current, trained, min_new_normal)
    base = decide_retraining(current, trained, 1)
    if base.retrain:
        return RetrainDecision(True, f"monitoring found drift ({drift.reason}); {base.reason}",
                               base.new_normal_images)
    return RetrainDecision(
        False,
        f"monitoring found drift ({drift.reason}), but {base.reason}: ingest normal images "
        "of the new kind (inspected) to retrain",
        base.new_normal_images,
    )
