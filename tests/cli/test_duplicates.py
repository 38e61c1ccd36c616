"""Identical images in a source, through the CLI (issue 12 item 4): a defect image copied
into ``train/good`` and the same image in ``train/good`` and ``test/good`` are errors naming
both files as the user gave them, in ``nestad train`` from a folder, ``nestad ingest`` and
``nestad validate``; repeats within one split are warnings; ``data.duplicates=warn`` keeps
one copy and names the others. Errors: exit code 2, one line, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_support import assert_one_line_error
from typer.testing import CliRunner

from components.cli.app import get_app

CASES = {  # table row -> (copy of which image, where the copy goes, what the line says)
    "defect_in_train_good": ("test/square/0000.png", "train/good/copied.png",
                             "identical bytes under two labels ('square' and 'good')"),
    "train_and_test_good": ("train/good/0000.png", "test/good/copied.png",
                            "identical bytes in two splits (test and "),
}


def _invoke(*args: object):
    return CliRunner().invoke(get_app(), [str(a) for a in args])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(make_dataset) -> Path:
    """An industrial folder; its file names are the ones the errors must give."""
    root = make_dataset("industrial", n_train=12, n_test=4, n_defect=4)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert {"train/good/0000.png", "test/square/0000.png"} <= set(names), names
    return root


def _copy(source: Path, case: str) -> tuple[Path, Path]:
    original, copy, _ = CASES[case]
    shutil.copy(source / original, source / copy)
    return source / original, source / copy


def _train(synth, source: Path, out: Path, *extra: str) -> list[object]:
    sets = synth.overrides(**{"data.source": str(source), "data.layout": "industrial"})
    args: list[object] = ["train", "-p", synth.repo / "params.yaml", "-o", out]
    for key, value in sets.items():
        args += ["-s", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return [*args, *extra]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A params.yaml for ingest and validate of a tiny industrial dataset (``data/toy``)."""
    root = tmp_path / "project"
    root.mkdir()
    params = {
        "data": {"layout": "industrial", "anomalous_class": None, "image_size": 16,
                 "val_fraction": 0.25, "min_image_size": 8},
        "ingest": {"name": "toy", "workers": 1, "track": False},
        "validation": {"labels": None, "data_docs": False},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


# --- nestad train on a folder -------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_refuses_identical_copies_naming_both_files(source, synth, tmp_path, case) -> None:
    original, copy = _copy(source, case)
    out = tmp_path / "run"
    line = assert_one_line_error(_invoke(*_train(synth, source, out)),
                                 str(original), str(copy), CASES[case][2], "data.duplicates")
    assert "images/" not in line.replace(str(source), "")  # the user's files, not stored ones
    assert not out.exists()


def test_train_with_duplicates_warn_keeps_one_copy_and_names_both(source, synth, tmp_path):
    original, copy = _copy(source, "defect_in_train_good")
    out = tmp_path / "run"
    result = _invoke(*_train(synth, source, out, "-s", "data.duplicates=warn"))
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if str(copy) in line]
    assert len(warned) == 1 and str(original) in warned[0] and "warning" in warned[0], warned


def test_train_names_a_repeat_within_one_split_and_goes_on(source, synth, tmp_path) -> None:
    shutil.copy(source / "train/good/0001.png", source / "train/good/again.png")
    result = _invoke(*_train(synth, source, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "again.png" in line]
    assert len(warned) == 1, result.output
    assert f"{source}/train/good/0001.png" in warned[0] and "repeated in" in warned[0]


# --- nestad ingest ------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_ingest_refuses_identical_copies_and_stores_nothing(source, project, case) -> None:
    original, copy = _copy(source, case)
    result = _invoke("ingest", source, "-p", project / "params.yaml")
    assert_one_line_error(result, str(original), str(copy), CASES[case][2])
    assert not (project / "data" / "toy").exists()


def test_ingest_refuses_a_new_copy_of_a_stored_image_and_leaves_the_dataset(source, project,
                                                                             tmp_path) -> None:
    params = project / "params.yaml"
    assert _invoke("ingest", source, "-p", params).exit_code == 0
    dataset = project / "data" / "toy"
    before = _files(dataset)
    more = tmp_path / "more"
    (more / "train" / "good").mkdir(parents=True)
    shutil.copy(source / "test/square/0001.png", more / "train/good/new.png")
    result = _invoke("ingest", more, "-p", params)
    assert_one_line_error(result, f"{more}/train/good/new.png",
                          f"{source}/test/square/0001.png", "under two labels")
    assert _files(dataset) == before


# --- nestad validate on a stored dataset ----------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_fails_a_dataset_ingested_with_warn_naming_both_files(source, project,
                                                                       case) -> None:
    original, copy = _copy(source, case)
    params = project / "params.yaml"
    ingested = _invoke("ingest", source, "-p", params, "-s", "data.duplicates=warn")
    assert ingested.exit_code == 0, ingested.output
    assert any(str(copy) in line and str(original) in line and line.startswith("warning:")
               for line in ingested.output.splitlines()), ingested.output
    before = _files(project / "data" / "toy")
    result = _invoke("validate", "-p", params)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (failed,) = [line for line in result.output.splitlines()
                 if "no_identical_copy_in_two_splits_or_labels" in line]
    assert str(original) in failed and str(copy) in failed and CASES[case][2] in failed
    assert _files(project / "data" / "toy") == before  # validation never writes the data
    passed = _invoke("validate", "-p", params, "-s", "data.duplicates=warn")
    assert passed.exit_code == 0, passed.output
    assert any(str(copy) in line and line.startswith("warning:")
               for line in passed.output.splitlines()), passed.output


def test_validate_names_the_file_the_user_gave_not_the_stored_one(source, project) -> None:
    params = project / "params.yaml"
    assert _invoke("ingest", source, "-p", params).exit_code == 0
    dataset = project / "data" / "toy"
    manifest = (dataset / "manifest.csv").read_text().splitlines()
    stored = next(line.split(",")[0] for line in manifest if "train/good/0002.png" in line)
    (dataset / stored).write_bytes(b"changed after ingestion")
    result = _invoke("validate", "-p", params)
    assert result.exit_code == 1, result.output
    (failed,) = [line for line in result.output.splitlines() if "files_match_sha256" in line]
    assert f"{source}/train/good/0002.png" in failed and stored not in failed, failed
