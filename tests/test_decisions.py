"""The retraining decisions: truth tables over model history, data version and counts, and
over the figures of a monitored batch against the ``monitor.*`` limits."""

from __future__ import annotations

import pytest

from components.config import MonitorConfig
from components.decisions import (
    DataState,
    decide_retraining,
    decide_retraining_on_drift,
    should_retrain,
)

OLD, NEW = "a" * 32, "b" * 32


@pytest.mark.parametrize(
    ("trained", "current", "min_new", "retrain", "new", "why"),
    [
        # no model yet: always train
        (None, DataState(NEW, 10), 1, True, None, "no model"),
        # same data version as the newest model: nothing new, whatever the counts say
        (DataState(NEW, 10), DataState(NEW, 10), 1, False, 0, "nothing new"),
        (DataState(NEW, None), DataState(NEW, None), 5, False, 0, "nothing new"),
        # the data changed: enough new normal training images -> retrain
        (DataState(OLD, 10), DataState(NEW, 11), 1, True, 1, "1 new normal"),
        (DataState(OLD, 10), DataState(NEW, 15), 5, True, 5, "5 new normal"),
        # the data changed, but too few new normal images (e.g. only test/anomalous ones)
        (DataState(OLD, 10), DataState(NEW, 10), 1, False, 0, "only 0 new normal"),
        (DataState(OLD, 10), DataState(NEW, 14), 5, False, 4, "only 4 new normal"),
        # the training data shrank: it was replaced, not appended to -> retrain
        (DataState(OLD, 10), DataState(NEW, 8), 1, True, -2, "replaced"),
        # the data changed and a count is unknown -> retrain rather than miss new data
        (DataState(OLD, None), DataState(NEW, 10), 1, True, None, "not countable"),
        (DataState(None, None), DataState(NEW, 10), 1, True, None, "not countable"),
    ],
)
def test_retraining_truth_table(trained, current, min_new, retrain, new, why):
    decision = decide_retraining(current, trained, min_new)
    assert decision.retrain is retrain
    assert decision.new_normal_images == new
    assert why in decision.reason


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="min_new_normal"):
        decide_retraining(DataState(NEW, 1), None, 0)
    with pytest.raises(ValueError, match="no version"):
        decide_retraining(DataState(None, None), DataState(OLD, 1))


# ----------------------------------------------------------------------------------------
# Monitoring: should_retrain
# ----------------------------------------------------------------------------------------

LIMITS = MonitorConfig(min_ks_pvalue=0.01, max_psi=0.25, max_flagged_fraction=0.2,
                       max_brightness_shift=20.0, max_contrast_change=0.3,
                       max_size_mismatch=0.05, max_channel_mismatch=0.05)


def _report(ks_p=0.5, psi=0.05, flagged=0.05, shift=1.0, change=0.0, size=0.0, channels=0.0):
    return {"score": {"ks_pvalue": ks_p, "psi": psi}, "flagged": {"fraction": flagged},
            "image": {"brightness": {"shift": shift}, "contrast": {"change": change},
                      "size_mismatch": size, "channel_mismatch": channels}}


@pytest.mark.parametrize(
    ("figures", "exceeded"),
    [
        ({}, ()),  # everything within its limits
        ({"ks_p": 0.01, "psi": 0.25, "flagged": 0.2, "shift": 20.0}, ()),  # on the limits: ok
        ({"ks_p": 0.009}, ("min_ks_pvalue",)),
        ({"psi": 0.26}, ("max_psi",)),
        ({"flagged": 0.21}, ("max_flagged_fraction",)),
        ({"shift": 25.0}, ("max_brightness_shift",)),
        ({"shift": -25.0}, ("max_brightness_shift",)),  # darker counts too
        ({"change": -0.5}, ("max_contrast_change",)),
        ({"size": 0.1}, ("max_size_mismatch",)),
        ({"channels": 1.0}, ("max_channel_mismatch",)),
        ({"ks_p": 1e-9, "psi": 2.0, "shift": 80.0}, ("min_ks_pvalue", "max_psi",
                                                     "max_brightness_shift")),
        ({"psi": float("nan")}, ("max_psi",)),  # not measured: never passes silently
        ({"ks_p": None}, ("min_ks_pvalue",)),
    ],
)
def test_should_retrain_truth_table(figures, exceeded):
    verdict = should_retrain(_report(**figures), LIMITS)
    assert verdict.exceeded == exceeded
    assert verdict.retrain is bool(exceeded)
    assert len(verdict.reasons) == len(exceeded)
    for key, reason in zip(exceeded, verdict.reasons, strict=True):
        assert f"monitor.{key}=" in reason


def test_should_retrain_reason_names_figure_and_limit():
    verdict = should_retrain(_report(shift=80.0), LIMITS)
    assert verdict.reason == "|brightness shift| 80 > monitor.max_brightness_shift=20"
    assert should_retrain(_report(), LIMITS).reason == "every figure within its limits"


DRIFT = should_retrain(_report(shift=80.0), LIMITS)
CALM = should_retrain(_report(), LIMITS)


@pytest.mark.parametrize(
    ("trained", "current", "min_new", "drift", "retrain", "why"),
    [
        # no verdict or no drift: exactly decide_retraining
        (DataState(OLD, 10), DataState(NEW, 12), 5, None, False, "only 2 new normal"),
        (DataState(OLD, 10), DataState(NEW, 12), 5, CALM, False, "only 2 new normal"),
        (DataState(OLD, 10), DataState(NEW, 15), 5, CALM, True, "5 new normal"),
        # drift: one new normal image is enough
        (DataState(OLD, 10), DataState(NEW, 12), 5, DRIFT, True, "monitoring found drift"),
        # drift, but nothing new to learn the new kind of images from: no retraining
        (DataState(NEW, 10), DataState(NEW, 10), 5, DRIFT, False, "ingest normal images"),
        (DataState(OLD, 10), DataState(NEW, 10), 1, DRIFT, False, "ingest normal images"),
        # no model yet: train, drift or not
        (None, DataState(NEW, 10), 5, DRIFT, True, "no model"),
    ],
)
def test_drift_as_a_retraining_trigger(trained, current, min_new, drift, retrain, why):
    decision = decide_retraining_on_drift(current, trained, min_new, drift)
    assert decision.retrain is retrain
    assert why in decision.reason
    if drift is DRIFT:
        assert "brightness shift" in decision.reason
