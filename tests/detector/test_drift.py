"""Drift statistics on hand-computed cases: PSI on quantile bins, the KS test, image
statistics, and the comparison of a batch with a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.detector.drift import (
    PSI_FLOOR,
    build_reference,
    compare_batch,
    image_statistics,
    ks_test,
    population_stability_index,
    psi_edges,
)

REF = np.arange(100, dtype=float)  # quantile edges at 9.9, 19.8, ... : 10 bins of 10 values


def test_psi_edges_are_the_reference_deciles():
    np.testing.assert_allclose(psi_edges(REF, 10), np.quantile(REF, np.arange(1, 10) / 10))
    assert len(psi_edges(np.zeros(50), 10)) == 1  # ties merge: two bins, below and above


def test_psi_of_the_same_distribution_is_zero():
    assert population_stability_index(REF, REF.copy(), 10) == pytest.approx(0.0, abs=1e-12)


def test_psi_by_hand_two_bins_moved():
    # New batch: 20 % in the first decile, 0 % in the second, 10 % in each other.
    new = np.concatenate([np.full(20, 1.0), np.arange(20, 100, dtype=float)])
    expected = (0.2 - 0.1) * math.log(0.2 / 0.1) + (PSI_FLOOR - 0.1) * math.log(PSI_FLOOR / 0.1)
    assert population_stability_index(REF, new, 10) == pytest.approx(expected, rel=1e-9)


def test_psi_by_hand_everything_above_the_reference():
    new = np.full(10, 1e6)  # all in the top bin
    expected = 9 * (PSI_FLOOR - 0.1) * math.log(PSI_FLOOR / 0.1) + (1 - 0.1) * math.log(1 / 0.1)
    assert population_stability_index(REF, new, 10) == pytest.approx(expected, rel=1e-9)


def test_psi_refuses_empty_input():
    with pytest.raises(ValueError):
        population_stability_index(REF, np.zeros(0))


def test_ks_by_hand():
    stat, p = ks_test(REF, REF.copy())
    assert stat == 0.0 and p == pytest.approx(1.0)
    stat, p = ks_test(REF, REF + 1000)  # disjoint: the CDFs differ by 1 somewhere
    assert stat == 1.0 and p < 1e-20
    stat, _ = ks_test(REF, REF[:50])  # the lower half: max CDF gap 0.5 at the median
    assert stat == pytest.approx(0.5)


def test_image_statistics_by_hand():
    images = np.zeros((2, 1, 2, 2), np.uint8)
    images[1, 0] = [[0, 100], [100, 200]]
    brightness, contrast = image_statistics(images)
    np.testing.assert_allclose(brightness, [0.0, 100.0])
    np.testing.assert_allclose(contrast, [0.0, np.std([0, 100, 100, 200])])


def _reference() -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(50, 150, size=(40, 3, 8, 8), dtype=np.uint8)
    return build_reference(np.linspace(0.0, 1.0, 40), images, [(32, 32), (0, 0)], [3],
                           threshold=0.9, which="fpr")


def test_reference_holds_sorted_scores_sizes_and_expected_flag_share():
    ref = _reference()
    assert ref["scores"] == sorted(ref["scores"]) and ref["count"] == 40
    assert ref["width"] == [32, 32] and ref["height"] == [32, 32]  # the unknown (0, 0) skipped
    assert ref["channels"] == [3]
    assert ref["threshold"]["flagged_fraction"] == pytest.approx(4 / 40)  # 0.9 .. 1.0


def test_compare_batch_measures_shifts_and_mismatches():
    ref = _reference()
    images = np.full((4, 3, 8, 8), 200, np.uint8)
    report = compare_batch(ref, np.array([0.1, 0.5, 2.0, 3.0]), np.array([0, 0, 1, 1]),
                           images, [(32, 32), (32, 32), (64, 48), (32, 32)], [3, 3, 3, 1])
    assert report["flagged"]["fraction"] == 0.5 and report["flagged"]["count"] == 2
    shift = report["image"]["brightness"]["shift"]
    assert shift == pytest.approx(200 - ref["brightness"]["mean"])
    assert report["image"]["contrast"]["change"] == pytest.approx(-1.0)  # flat images
    assert report["image"]["size_mismatch"] == 0.25
    assert report["image"]["channel_mismatch"] == 0.25
    assert report["score"]["ks_statistic"] == pytest.approx(0.5)  # two above every reference


def test_unknown_reference_channels_are_not_counted_as_mismatch():
    ref = _reference() | {"channels": []}
    report = compare_batch(ref, np.zeros(3), np.zeros(3), np.zeros((3, 3, 8, 8), np.uint8),
                           [(32, 32)] * 3, [1, 1, 1])
    assert report["image"]["channel_mismatch"] == 0.0
