"""Identical copies: which kind, which copy is kept, what the policy does (truth tables)."""

from __future__ import annotations

import pandas as pd
import pytest

from components.data.duplicates import (
    COPIES_COLUMN,
    ImageCopy,
    apply_policy,
    classify,
    decode_copies,
    encode_copies,
    find_duplicates,
    manifest_findings,
    pick_copy,
)
from components.errors import DataError

GOOD_TRAIN = ImageCopy("s/train/good/a.png", "good", "train", True)
GOOD_TRAIN_2 = ImageCopy("s/train/good/b.png", "good", "train", True)
GOOD_TEST = ImageCopy("s/test/good/c.png", "good", "test", True)
CRACK = ImageCopy("s/test/crack/d.png", "crack", "test", False)


@pytest.mark.parametrize(("kept", "other", "kind"), [
    (CRACK, GOOD_TRAIN, "two_labels"),  # a defect image copied into train/good
    (GOOD_TEST, GOOD_TRAIN, "two_splits"),  # the same image in train/good and test/good
    (GOOD_TRAIN, GOOD_TRAIN_2, "repeat"),
    (ImageCopy("x", "good", "val", True), GOOD_TRAIN, "two_splits"),
])
def test_classify(kept, other, kind) -> None:
    assert classify(kept, other) == kind


def test_the_anomalous_then_the_test_copy_is_kept() -> None:
    assert pick_copy([GOOD_TRAIN, GOOD_TEST, CRACK]) is CRACK
    assert pick_copy([GOOD_TRAIN_2, GOOD_TEST, GOOD_TRAIN]) is GOOD_TEST
    assert pick_copy([GOOD_TRAIN_2, GOOD_TRAIN]) is GOOD_TRAIN  # then by name


def test_fail_raises_on_leaks_and_mislabels_naming_both_files_and_warns_on_repeats() -> None:
    findings = find_duplicates([[GOOD_TRAIN, CRACK], [GOOD_TEST], [GOOD_TRAIN_2, GOOD_TEST]])
    assert [f.kind for f in findings] == ["two_labels", "two_splits"]
    with pytest.raises(DataError) as caught:
        apply_policy(findings, "fail")
    assert str(caught.value).startswith(
        "s/test/crack/d.png and s/train/good/a.png: identical bytes under two labels "
        "('crack' and 'good'); 1 more such copy (data.duplicates: fail;")
    warned = apply_policy(findings, "warn")
    assert warned[1] == ("s/test/good/c.png and s/train/good/b.png: identical bytes in two "
                         "splits (test and train): a test image would also be trained on")
    repeat = find_duplicates([[GOOD_TRAIN, GOOD_TRAIN_2]])
    assert apply_policy(repeat, "fail") == [
        "s/train/good/a.png and s/train/good/b.png: identical bytes repeated in train "
        "('good'); kept once"]
    assert apply_policy([], "fail") == []


def test_copies_cells_round_trip_and_bad_cells_are_named() -> None:
    assert encode_copies([]) == "" and decode_copies(float("nan"), "m") == []
    assert decode_copies(encode_copies([GOOD_TRAIN, CRACK]), "m") == [GOOD_TRAIN, CRACK]
    with pytest.raises(DataError, match="m: unreadable copies cell"):
        decode_copies("[1, 2", "m")


def test_manifest_findings_judge_rows_and_recorded_copies() -> None:
    frame = pd.DataFrame({
        "path": ["images/1.png", "images/2.png", "images/3.png"],
        "sha256": ["a" * 64, "b" * 64, "b" * 64],
        "label": ["crack", "good", "good"],
        "is_normal": [False, True, True],
        "split": ["test", "train", "val"],
        "source": ["s/test/crack/d.png", "s/train/good/e.png", ""],  # no source: its path
        COPIES_COLUMN: [encode_copies([GOOD_TRAIN]), float("nan"), float("nan")],
    })
    found = {(at, f.kind, f.other.name) for at, f in manifest_findings(frame)}
    assert found == {(0, "two_labels", "s/train/good/a.png"),
                     (2, "two_splits", "s/train/good/e.png")}  # kept: the first name (images/3.png)
    old = frame.drop(columns=COPIES_COLUMN)  # written before the column: rows alone
    assert [(at, f.kind) for at, f in manifest_findings(old)] == [(2, "two_splits")]
