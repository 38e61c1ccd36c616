"""Serving: request decoding and scoring (no MLflow), then the REST server on loopback."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow_support import (
    DATASET,
    bin_path,
    free_port,
    loopback,
    project_template,
    quiet_env,
    registered_project,
    server,
)

from components.detector.package import load_detector
from components.errors import DataError
from components.pipeline.stages import score_paths
from components.registry.serve import encode_image, example_request, score_request


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The template's detector.pt and its test images."""
    root = project_template(tmp_path_factory)
    return (
        root / "outputs" / "model" / "detector.pt",
        sorted((root / DATASET / "test").rglob("*.png")),
    )


def test_paths_and_base64_score_exactly_like_nestad_score(model: tuple[Path, list[Path]]) -> None:
    file, images = model
    detector, meta = load_detector(file)
    expected = pd.DataFrame(score_paths(file, images, None))
    by_path = score_request(detector, meta, pd.DataFrame({"path": [str(p) for p in images]}))
    by_b64 = score_request(
        detector, meta, pd.DataFrame({"image_b64": [encode_image(p) for p in images]})
    )
    mixed = score_request(
        detector,
        meta,
        pd.DataFrame(
            {"path": [str(images[0]), None], "image_b64": [None, encode_image(images[1])]}
        ),
    )
    assert list(by_path.columns) == ["score", "normalised_score", "is_anomaly"]
    for frame in (by_path, by_b64):
        assert frame["score"].tolist() == expected["score"].tolist()
        assert frame["normalised_score"].tolist() == expected["normalised_score"].tolist()
        assert frame["is_anomaly"].tolist() == expected["is_anomaly"].tolist()
    assert mixed["score"].tolist() == expected["score"].tolist()[:2]


def test_threshold_parameter_picks_the_threshold(model: tuple[Path, list[Path]]) -> None:
    file, images = model
    detector, meta = load_detector(file)
    frame = pd.DataFrame({"path": [str(p) for p in images]})
    for which in ("fpr", "fixed"):
        out = score_request(detector, meta, frame, threshold=which)
        cut = meta["norm"].threshold(which)
        assert out["is_anomaly"].tolist() == (out["normalised_score"] >= cut).tolist()
    with pytest.raises(DataError, match="threshold 'median'"):
        score_request(detector, meta, frame, threshold="median")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"path": ["a.png"], "image_b64": ["aGk="]}), "exactly one of"),
        (pd.DataFrame({"path": [None], "image_b64": [float("nan")]}), "exactly one of"),
        (pd.DataFrame({"image_b64": ["***"]}), "not valid base64"),
        (
            pd.DataFrame({"image_b64": [base64.b64encode(b"not an image").decode()]}),
            "not an image file",
        ),
        (pd.DataFrame({"path": ["/nonexistent/x.png"]}), "cannot read /nonexistent/x.png"),
        (pd.DataFrame({"image": ["x"]}), "expected a 'path' and/or an 'image_b64' column"),
    ],
)
def test_bad_requests_name_the_row_and_the_fault(
    model: tuple[Path, list[Path]], frame: pd.DataFrame, message: str
) -> None:
    detector, meta = load_detector(model[0])
    with pytest.raises(DataError, match=message):
        score_request(detector, meta, frame)


def test_empty_request_and_example(model: tuple[Path, list[Path]]) -> None:
    detector, meta = load_detector(model[0])
    empty = score_request(detector, meta, pd.DataFrame({"path": pd.Series([], dtype=str)}))
    assert empty.empty and list(empty.columns) == ["score", "normalised_score", "is_anomaly"]
    example = example_request(meta["image_size"], meta["channels"])
    assert len(score_request(detector, meta, example)) == 1


# --- REST: mlflow models serve on 127.0.0.1 ----------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[Path], Any]]:
    """``models:/served-detector@production`` (the session's logged model) behind
    ``mlflow models serve --env-manager local``."""
    from components.registry.client import open_registry
    from components.registry.promote import promote

    with quiet_env(tmp_path_factory.mktemp("serving")) as env:
        shared = registered_project(tmp_path_factory)
        project = shared.project
        reg = open_registry(
            project.params.registry.model_copy(update={"model_name": "served-detector"}),
            project.root,
        )
        source = reg.client.get_model_version("nestad-detector", shared.version.version)
        reg.client.create_registered_model("served-detector")
        mv = reg.client.create_model_version(
            "served-detector", source.source, run_id=source.run_id, tags=source.tags
        )
        promote(reg, "production", str(mv.version), force=True, reason="serving test")
        env.setenv("MLFLOW_TRACKING_URI", project.uri)
        port = free_port()
        serve = [bin_path("mlflow"), "models", "serve", "-m", "models:/served-detector@production"]
        with server(
            [*serve, "--env-manager", "local", *loopback(port)],
            f"http://127.0.0.1:{port}/ping",
            timeout=180,
        ):
            yield (
                f"http://127.0.0.1:{port}",
                sorted((project.root / DATASET / "test").rglob("*.png")),
                project,
            )


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rest_invocations_answer_with_the_same_figures(served: tuple[str, list[Path], Any]) -> None:
    url, images, project = served
    status, body = _post(
        url,
        {
            "dataframe_split": {
                "columns": ["image_b64"],
                "data": [[encode_image(p)] for p in images],
            }
        },
    )
    assert status == 200, body
    expected = score_paths(project.out / "model", images, None)
    assert [p["score"] for p in body["predictions"]] == pytest.approx(
        [r["score"] for r in expected], rel=1e-12
    )
    assert [p["is_anomaly"] for p in body["predictions"]] == [r["is_anomaly"] for r in expected]

    status, body = _post(
        url,
        {
            "dataframe_records": [{"image_b64": encode_image(images[0])}],
            "params": {"threshold": "fpr"},
        },
    )
    assert status == 200 and body["predictions"][0]["score"] == pytest.approx(
        expected[0]["score"], rel=1e-12
    )


def test_rest_rejects_a_bad_request(served: tuple[str, list[Path], Any]) -> None:
    url, _, _ = served
    status, body = _post(url, {"dataframe_split": {"columns": ["image_b64"], "data": [["***"]]}})
    assert status >= 400 and "not valid base64" in json.dumps(body)
