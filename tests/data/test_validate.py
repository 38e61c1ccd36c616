"""Validation: every expectation passes on a clean dataset and fails, naming the offending
files, on a dataset crafted to break it."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import DataConfig, ExpectedCounts, IngestConfig, ValidateConfig
from components.data.images import sha256_hex
from components.data.ingest import ingest
from components.data.validate import CLASH_RULE, validate_dataset
from components.errors import ValidationFailed

DATA_CFG = DataConfig(anomalous_class="bird", val_fraction=0.25, seed=1)
LABELS = ("cat", "dog", "bird")


def _png(seed: int, size: int = 32, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """An ingested dataset: 3 classes x (6 train + 2 test) images, bird anomalous."""
    root = tmp_path_factory.mktemp("clean")
    seed = 0
    for partition, n in (("train", 6), ("test", 2)):
        for label in LABELS:
            folder = root / "src" / partition / label
            folder.mkdir(parents=True)
            for i in range(n):
                seed += 1
                (folder / f"{i}.png").write_bytes(_png(seed))
    report = ingest(
        str(root / "src"), IngestConfig(workers=1), DATA_CFG, target=root / "data" / "toy"
    )
    assert report.totals["val"] > 0 and report.totals["train"] > 0
    return report.dataset


def _counts(dataset: Path) -> ExpectedCounts:
    frame = pd.read_csv(dataset / "manifest.csv")
    test = frame[frame.split == "test"]
    return ExpectedCounts(
        train_val_normal=int((frame.split != "test").sum()),
        test_normal=int(test.is_normal.sum()),
        test_anomalous=int((~test.is_normal).sum()),
    )


def _cfg(dataset: Path, **changes) -> ValidateConfig:
    base = {"labels": LABELS, "expected_counts": _counts(dataset), "data_docs": False}
    return ValidateConfig(**(base | changes))


def test_a_clean_dataset_passes_every_expectation_and_writes_reports(clean, tmp_path):
    report = validate_dataset(
        clean, _cfg(clean, data_docs=True), DATA_CFG, report_dir=tmp_path / "reports"
    )
    assert report.success, [o.describe() for o in report.failures]
    names = {o.name for o in report.outcomes}
    assert {
        "train_only_normal",
        "val_only_normal",
        "test_has_normal",
        "test_has_anomalous",
        "no_sha256_in_two_splits",
        "no_sha256_twice_in_train",
        "every_image_decodes",
        "files_match_sha256",
        "channels_convertible",
        "width_at_least_min",
        "height_at_least_min",
        "pixels_at_most_max",
        "labels_declared",
        "normal_flag_matches_label",
        "count_train_val_normal",
        "count_test_normal",
        "count_test_anomalous",
    } <= names
    assert report.images == 24 and report.counts["test"] == {"normal": 4, "anomalous": 8}
    result = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert result["success"] is True and len(result["results"]) == len(report.outcomes)
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["success"] is True and summary["images"] == 24
    assert report.data_docs == tmp_path / "reports" / "data_docs" / "index.html"
    assert report.data_docs.is_file()
    report.raise_for_failures()  # passes silently
    # Validating the same data again leaves summary.json (a training dependency) as it was.
    before = (tmp_path / "reports" / "summary.json").read_bytes()
    validate_dataset(clean, _cfg(clean, data_docs=True), DATA_CFG, report_dir=tmp_path / "reports")
    assert (tmp_path / "reports" / "summary.json").read_bytes() == before


def _copy(clean: Path, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    dataset = tmp_path / "toy"
    shutil.copytree(clean, dataset)
    return dataset, pd.read_csv(dataset / "manifest.csv")


def _replace_image(dataset: Path, frame: pd.DataFrame, i: int, data: bytes) -> None:
    """Put other bytes at row ``i``'s path and make the manifest agree about its hash."""
    (dataset / frame.at[i, "path"]).write_bytes(data)
    frame.loc[i, "sha256"] = sha256_hex(data)


def test_each_row_expectation_fails_naming_exactly_its_offending_files(clean, tmp_path):
    """One crafted dataset, one defect per row: each expectation must flag its rows only."""
    dataset, frame = _copy(clean, tmp_path)
    pools = {key: list(rows.index) for key, rows in frame.groupby(["split", "is_normal"])}
    expected: dict[str, set[str]] = {}

    def take(split: str, normal: bool) -> int:
        return pools[(split, normal)].pop(0)

    def expect(i: int, *names: str) -> None:  # examples name the file the user gave
        for name in names:
            expected.setdefault(name, set()).add(frame.at[i, "source"])

    def copy_of(i: int, stored: str, given: str) -> str:
        """Row i's bytes again, stored as ``images/<stored>``, ingested from ``given``."""
        shutil.copy(dataset / frame.at[i, "path"], dataset / "images" / stored)
        frame.loc[len(frame)] = frame.loc[i]
        name = str(Path(frame.at[i, "source"]).with_name(given))
        frame.loc[len(frame) - 1, ["path", "source"]] = [f"images/{stored}", name]
        return name

    i = take("test", False)  # an anomalous image moved into train ...
    frame.loc[i, "split"] = "train"
    expect(i, "train_only_normal")
    i = take("test", False)  # ... and into val
    frame.loc[i, "split"] = "val"
    expect(i, "val_only_normal")
    i = take("train", True)  # the same bytes in train and in val
    leak = copy_of(i, "leak.png", "leak.png")
    frame.loc[len(frame) - 1, "split"] = "val"
    expect(i, "no_sha256_in_two_splits")
    expect(len(frame) - 1, "no_sha256_in_two_splits")
    (a, a_split), (b, b_split) = sorted([(frame.at[i, "source"], "train"), (leak, "val")])
    expected[CLASH_RULE] = {f"{a} and {b}: identical bytes in two splits ({a_split} and "
                            f"{b_split})"}  # both files named, one offending (kept) row
    i = take("train", True)  # the same bytes twice in train
    twice = copy_of(i, "twice.png", "twice.png")
    expect(i, "no_sha256_twice_in_train")
    expect(len(frame) - 1, "no_sha256_twice_in_train")
    repeat = sorted([frame.at[i, "source"], twice]), frame.at[i, "label"]
    i = take("train", True)  # not an image at all, though the hash matches
    _replace_image(dataset, frame, i, b"\x89PNG\r\n\x1a\n but not really")
    expect(i, "every_image_decodes")
    i = take("val", True)  # changed on disk after ingestion
    (dataset / frame.at[i, "path"]).write_bytes(_png(999))
    expect(i, "files_match_sha256")
    i = take("test", False)  # deleted
    (dataset / frame.at[i, "path"]).unlink()
    expect(i, "files_match_sha256", "every_image_decodes")
    # Grey, palette and CMYK images among RGB ones, and one smaller than the model input
    # (16 < data.image_size=32, >= data.min_image_size=8): training converts and resizes
    # them, so validation accepts them (no expectation flags these rows).
    for mode, fmt, seed in (("L", "PNG", 5), ("P", "PNG", 7), ("CMYK", "TIFF", 9)):
        buf = io.BytesIO()
        Image.open(io.BytesIO(_png(seed))).convert(mode).save(buf, fmt)
        _replace_image(dataset, frame, take("train", True), buf.getvalue())
    _replace_image(dataset, frame, take("test", True), _png(4, size=16))
    i = take("test", False)  # smaller than data.min_image_size: training refuses it
    _replace_image(dataset, frame, i, _png(6, size=4))
    expect(i, "width_at_least_min", "height_at_least_min")
    i = take("test", False)  # more pixels than data.max_image_pixels (1,600 below)
    _replace_image(dataset, frame, i, _png(8, size=48))
    expect(i, "pixels_at_most_max", "every_image_decodes")  # refused before decoding
    i = take("train", True)  # a label nobody declared
    frame.loc[i, "label"] = "zebra"
    expect(i, "labels_declared")
    i = take("test", True)  # a cat or dog marked anomalous
    frame.loc[i, "is_normal"] = False
    expect(i, "normal_flag_matches_label")
    i = take("test", False)  # a path escaping the dataset folder
    frame.loc[i, "path"] = "../outside.png"
    expect(i, "paths_inside_dataset", "files_match_sha256", "every_image_decodes")
    i = take("test", False)
    frame.loc[i, "sha256"] = "XYZ"
    expect(i, "sha256_well_formed", "files_match_sha256")
    i = take("test", True)
    frame.loc[i, "split"] = "holdout"
    expect(i, "split_known")
    frame.to_csv(dataset / "manifest.csv", index=False)

    cfg = _cfg(clean, expected_counts=ExpectedCounts(), examples=20)
    data_cfg = DATA_CFG.model_copy(update={"max_image_pixels": 1600})  # 40 x 40
    report = validate_dataset(dataset, cfg, data_cfg, report_dir=tmp_path / "reports")

    assert not report.success
    failures = {o.name: o for o in report.failures}
    assert set(failures) == set(expected), [o.describe() for o in report.failures]
    for name, paths in expected.items():
        assert set(failures[name].examples) == paths, name
        assert failures[name].unexpected_count == len(paths), name
    (moved,) = expected["train_only_normal"]
    assert failures["train_only_normal"].describe() == (
        f"train_only_normal: train holds only normal images -- 1 offending row; first: {moved}"
    )
    with pytest.raises(ValidationFailed) as excinfo:
        report.raise_for_failures()
    assert all(name in str(excinfo.value) for name in expected)
    assert "leak.png" in str(excinfo.value)
    (first, second), label = repeat
    assert report.warnings == (f"{first} and {second}: identical bytes repeated in train "
                               f"({label!r}); kept once",)
    assert json.loads((tmp_path / "reports" / "validation.json").read_text())["success"] is False


def test_split_composition_and_protocol_counts_fail_on_crafted_datasets(clean, tmp_path):
    dataset, frame = _copy(clean, tmp_path)
    frame[frame.is_normal].to_csv(dataset / "manifest.csv", index=False)  # no anomalies
    protocol = ExpectedCounts(train_val_normal=45_000, test_normal=9_000, test_anomalous=6_000)
    report = validate_dataset(
        dataset, _cfg(clean, expected_counts=protocol), DATA_CFG, report_dir=tmp_path / "r1"
    )
    failures = {o.name: o for o in report.failures}
    assert set(failures) == {
        "test_has_anomalous",
        "count_train_val_normal",
        "count_test_normal",
        "count_test_anomalous",
    }
    assert failures["count_test_anomalous"].observed == 0
    assert "test/anomalous holds exactly 6,000 images -- observed 0" in (
        failures["count_test_anomalous"].describe()
    )

    kept = frame[(frame.split == "train") | ((frame.split == "test") & ~frame.is_normal)]
    kept.to_csv(dataset / "manifest.csv", index=False)  # no val, no normal test images
    report = validate_dataset(
        dataset, _cfg(clean, expected_counts=ExpectedCounts()), DATA_CFG, report_dir=tmp_path / "r2"
    )
    assert {o.name for o in report.failures} == {"test_has_normal", "val_not_empty"}


def test_cli_validate_exits_non_zero_on_failure(clean, tmp_path):
    import typer
    from typer.testing import CliRunner

    from components.cli.data import register

    app = typer.Typer()
    register(app)
    (tmp_path / "params.yaml").write_text(
        "data:\n  anomalous_class: bird\nvalidation:\n  data_docs: false\n"
        "  expected_counts: {test_anomalous: 6000}\n"
    )
    args = ["validate", str(clean), "-p", str(tmp_path / "params.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "count_test_anomalous: test/anomalous holds exactly 6,000 images -- observed 8" in (
        result.output
    )
    ok = CliRunner().invoke(app, [*args, "-s", "validation.expected_counts.test_anomalous=8"])
    assert ok.exit_code == 0 and "validation passed" in ok.output
    missing = CliRunner().invoke(
        app, ["validate", str(tmp_path / "nope"), "-p", str(tmp_path / "params.yaml")]
    )
    assert missing.exit_code == 2  # an unreadable dataset is a user error, not a failed gate
    assert (
        missing.output.strip() == f"error: {tmp_path / 'nope' / 'manifest.csv'}: no manifest "
        "(run `nestad ingest` first)"
    )
