"""Parallel batch scoring: the chunk scorer (no Prefect), the flow on a local Dask cluster,
S3 prefixes on a moto server, and the ``nestad score --workers`` command."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.config import IngestConfig
from components.detector.evaluate import NormStats
from components.detector.package import build_detector, save_detector
from components.errors import DataError
from components.pipeline.batch_scoring import COLUMNS, chunked, list_images, score_chunk
from components.pipeline.stages import score_paths


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_params) -> Path:
    """An untrained tiny detector file (the figures do not matter, their equality does)."""
    params = tiny_params()
    torch.manual_seed(0)
    detector = build_detector(params.model, 3, params.data.image_size, 0.9)
    norm = NormStats(0.0, 2.0, {}, 4, 0.2, 0.5, 0.05)
    path = tmp_path_factory.mktemp("model") / "detector.pt"
    save_detector(path, detector, params.model, 3, params.data.image_size, norm, "fixed")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, synth) -> Path:
    """Eleven images in two sub-folders, one broken file and one non-image file."""
    root = tmp_path_factory.mktemp("images")
    synth.write_images(root / "b", "blob", 6)
    synth.write_images(root / "a", "stripes", 5, size=24)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect API and database for this module."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=240):
            yield


def _by_path(rows: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in rows}


def test_chunks_give_the_serial_scores_and_an_error_row_per_bad_image(
    model: Path, folder: Path
) -> None:
    refs = list_images([folder])
    paths = [r.path for r in refs]
    assert paths == sorted(paths) and len(paths) == 12  # the .txt is not listed
    rows = [row for chunk in chunked(refs, 5) for row in score_chunk(model, chunk)]
    assert [r["path"] for r in rows] == paths
    assert all(set(r) == set(COLUMNS) for r in rows)
    broken = _by_path(rows)[str(folder / "a" / "broken.png")]
    assert broken["score"] is None and "broken.png" in broken["error"]
    good = [Path(p) for p in paths if not p.endswith("broken.png")]
    serial = _by_path(score_paths(model, good, None))
    for row in rows:
        if row["error"] is None:
            expected = serial[row["path"]]
            assert row["score"] == pytest.approx(expected["score"], rel=1e-6)
            assert row["normalised_score"] == pytest.approx(expected["normalised_score"],
                                                            rel=1e-6, abs=1e-9)
            assert row["is_anomaly"] == expected["is_anomaly"]
    assert sum(r["error"] is None for r in rows) == 11


def test_listing_errors_name_the_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder holds no image files"):
        list_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="absent: no such file"):
        list_images([tmp_path / "absent"])
    with pytest.raises(Exception, match="chunk size"):
        chunked([], 0)


def test_flow_on_a_local_dask_cluster_keeps_the_listing_order(
    model: Path, folder: Path, tmp_path: Path, prefect: None
) -> None:
    from flows.scoring import score_in_parallel

    out = tmp_path / "scores.parquet"
    report = score_in_parallel([str(folder)], model, out, workers=2, chunk_size=3)
    refs = list_images([folder])
    assert [r["path"] for r in report.rows] == [r.path for r in refs]
    assert report.chunks == 4 and report.failed == 1 and report.workers == 2
    expected = {r["path"]: r for c in chunked(refs, 12) for r in score_chunk(model, c)}
    for row in report.rows:
        assert row["score"] == expected[row["path"]]["score"]
    frame = pd.read_parquet(out)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["path"].tolist() == [r.path for r in refs]
    assert frame["error"].notna().sum() == 1 and frame["score"].isna().sum() == 1


@pytest.mark.integration
def test_s3_prefix_is_listed_downloaded_and_scored(
    model: Path, folder: Path, tmp_path: Path, moto_endpoint: str, fake_aws: None,
    monkeypatch: pytest.MonkeyPatch, prefect: None,
) -> None:
    import boto3

    from flows.cli import get_app

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="plant")
    local = list_images([folder])
    for ref in local:
        key = "line-1/" + Path(ref.path).relative_to(folder).as_posix()
        s3.upload_file(ref.path, "plant", key)
    s3.put_object(Bucket="plant", Key="line-1/readme.txt", Body=b"skipped")
    s3.put_object(Bucket="plant", Key="other/x.png", Body=b"outside the prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    target = tmp_path / "s3.csv"
    from typer.testing import CliRunner

    done = CliRunner().invoke(
        get_app(), ["score", "s3://plant/line-1", "-m", str(model), "--output", str(target),
                    "--workers", "2"]
    )
    assert done.exit_code == 0, done.output
    assert "1 errors" in done.output or "1 error" in done.output
    with target.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [
        "s3://plant/line-1/" + Path(r.path).relative_to(folder).as_posix() for r in local
    ]
    local_rows = {Path(r["path"]).relative_to(folder).as_posix(): r
                  for r in score_chunk(model, local)}
    for row in rows:
        want = local_rows[row["path"].removeprefix("s3://plant/line-1/")]
        if want["error"]:
            assert row["score"] == "" and "broken.png" in row["error"]
        else:
            assert float(row["score"]) == pytest.approx(want["score"], rel=1e-9)
            assert row["is_anomaly"] == str(want["is_anomaly"])
    missing = CliRunner().invoke(get_app(), ["score", "s3://plant/nothing-here", "-m",
                                             str(model), "--workers", "1"])
    assert missing.exit_code == 2 and "s3://plant/nothing-here" in missing.output


def test_score_command_workers_prints_csv_with_an_error_column(
    model: Path, folder: Path, prefect: None
) -> None:
    from typer.testing import CliRunner

    from flows.cli import get_app

    done = CliRunner().invoke(get_app(), ["score", str(folder / "b"), "-m", str(model),
                                          "--workers", "1"])
    assert done.exit_code == 0, done.output
    text = done.stdout[done.stdout.index("path,score"):]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 6
    serial = _by_path(score_paths(model, [folder / "b"], None))
    assert [float(r["score"]) for r in rows] == pytest.approx(
        [serial[r["path"]]["score"] for r in rows], rel=1e-6)
    refused = CliRunner().invoke(get_app(), ["score", str(folder), "-m", str(model),
                                             "--workers", "2", "--maps", "m"])
    assert refused.exit_code == 2 and "--maps" in refused.output
    assert IngestConfig().s3_endpoint_url is None


def test_an_existing_dask_cluster_by_address(model: Path, folder: Path, prefect: None) -> None:
    """``--dask-address``: the scheduler of a cluster started elsewhere (here in-process,
    so its workers share this test's Prefect API) runs the chunks."""
    from distributed import LocalCluster

    from flows.scoring import score_in_parallel

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster:
        report = score_in_parallel([str(folder / "b")], model, None,
                                   address=cluster.scheduler_address, chunk_size=2)
    assert report.address == cluster.scheduler_address and report.workers is None
    assert report.chunks == 3 and report.failed == 0
    serial = _by_path(score_paths(model, [folder / "b"], None))
    assert [r["path"] for r in report.rows] == list(serial)
    assert [r["score"] for r in report.rows] == pytest.approx(
        [s["score"] for s in serial.values()], rel=1e-6)


def test_a_chunk_that_fails_as_a_whole_gives_error_rows_not_a_lost_batch(
    model: Path, folder: Path, prefect: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import flows.scoring
    from flows.scoring import score_in_parallel

    refs = list_images([folder / "b"])
    doomed = refs[2].path
    calls = tmp_path / "calls"  # a file: the task function travels pickled, its closure too

    def flaky(model_, chunk, *args, **kwargs):  # the threaded workers share this process
        if any(r.path == doomed for r in chunk):
            with calls.open("a") as fh:
                fh.write("call\n")
            raise RuntimeError("worker lost")
        return score_chunk(model_, chunk, *args, **kwargs)

    monkeypatch.setattr(flows.scoring, "score_chunk", flaky)
    report = score_in_parallel([str(folder / "b")], model, None, workers=2, chunk_size=2)
    assert calls.read_text().count("call") == 2  # tried, then retried once
    assert [r["path"] for r in report.rows] == [r.path for r in refs]
    lost = [r for r in report.rows if r["error"]]
    assert [r["path"] for r in lost] == [refs[2].path, refs[3].path]  # the doomed chunk
    assert all("chunk failed: " in r["error"] and "worker lost" in r["error"] for r in lost)
    assert all(r["score"] is not None for r in report.rows if not r["error"])
