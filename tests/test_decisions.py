"""The retraining decision: a truth table over model history, data version and counts."""

from __future__ import annotations

import pytest

from components.decisions import DataState, decide_retraining

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
