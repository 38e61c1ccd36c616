"""Serving: request decoding and scoring (no MLflow), then the REST server on loopback."""

from __future__ import annotations

import base64
import io
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow_support import (
    DATASET,
    bin_path,
    free_port,
    loopback,
    quiet_env,
    registered_project,
    server,
    template_detector,
)
from PIL import Image

from components.data.images import to_model_input
from components.detector.overlay import overlay
from components.detector.package import load_detector
from components.errors import DataError
from components.pipeline.stages import score_paths
from components.registry.serve import (
    MAP_COLUMN,
    OUTPUT_COLUMNS,
    encode_image,
    example_request,
    request_images,
    score_request,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The template's detector.pt and its test images."""
    return template_detector(tmp_path_factory)


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


def _expected_overlays(file: Path, images: list[Path]) -> tuple[list[float], list[np.ndarray]]:
    """The PyTorch path: load_detector + score_with_maps on the decoded model-size inputs,
    each map drawn over its input (what ``map_png`` should hold)."""
    detector, meta = load_detector(file)
    pixels = request_images(
        pd.DataFrame({"path": [str(p) for p in images]}), meta["image_size"], meta["channels"]
    )
    score, _, _, maps01 = detector.score_with_maps(to_model_input(pixels))
    pictures = [
        np.asarray(overlay(p, m[0].numpy()))
        for p, m in zip(pixels.permute(0, 2, 3, 1).numpy(), maps01, strict=True)
    ]
    return score.tolist(), pictures


def _decoded(b64: str) -> np.ndarray:
    picture = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert picture.format == "PNG"
    return np.asarray(picture)


def _assert_same_pictures(got: list[str], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for b64, want in zip(got, expected, strict=True):
        picture = _decoded(b64)
        assert picture.shape == want.shape and picture.dtype == np.uint8
        assert np.abs(picture.astype(np.int16) - want.astype(np.int16)).max() <= 1


def test_maps_add_an_overlay_png_per_row_and_leave_the_scores(
    model: tuple[Path, list[Path]],
) -> None:
    file, images = model
    detector, meta = load_detector(file)
    frame = pd.DataFrame({"image_b64": [encode_image(p) for p in images]})
    plain = score_request(detector, meta, frame)
    with_maps = score_request(detector, meta, frame, maps=True)
    assert list(with_maps.columns) == ["score", "normalised_score", "is_anomaly", MAP_COLUMN]
    pd.testing.assert_frame_equal(with_maps.drop(columns=MAP_COLUMN), plain)
    scores, pictures = _expected_overlays(file, images)
    assert with_maps["score"].tolist() == pytest.approx(scores, rel=1e-12)
    _assert_same_pictures(with_maps[MAP_COLUMN].tolist(), pictures)
    size = meta["image_size"]
    assert all(p.shape == (size, size, 3) for p in pictures)  # the model input size
    empty = score_request(detector, meta, pd.DataFrame({"path": pd.Series([], dtype=str)}),
                          maps=True)
    assert empty.empty and MAP_COLUMN in empty.columns


def test_pyfunc_round_trip_gives_the_pytorch_scores_and_maps(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logged MLflow model, loaded with mlflow.pyfunc: ``params={"maps": True}`` reaches
    predict (the signature declares it; MLflow drops undeclared params) and the answer
    matches load_detector + score_with_maps."""
    import mlflow
    from mlflow.types.schema import DataType

    with quiet_env(tmp_path_factory.mktemp("pyfunc")) as env:
        shared = registered_project(tmp_path_factory)
        project = shared.project
        env.setenv("MLFLOW_TRACKING_URI", project.uri)
        monkeypatch.setattr(sys, "path", list(sys.path))  # load_model prepends the model code
        images = sorted((project.root / DATASET / "test").rglob("*.png"))
        info = mlflow.models.get_model_info(shared.version.model_uri)
        params = {p.name: (p.dtype, p.default) for p in info.signature.params.params}
        assert params["maps"] == (DataType.boolean, False)
        assert MAP_COLUMN in [c["name"] for c in info.signature.outputs.to_dict()]
        loaded = mlflow.pyfunc.load_model(shared.version.model_uri)
        frame = pd.DataFrame({"image_b64": [encode_image(p) for p in images]})
        plain = loaded.predict(frame)
        with_maps = loaded.predict(frame, params={"maps": True})
        off = loaded.predict(frame, params={"maps": False})
    assert list(plain.columns) == list(OUTPUT_COLUMNS)
    assert list(off.columns) == list(OUTPUT_COLUMNS)
    assert list(with_maps.columns) == [*OUTPUT_COLUMNS, MAP_COLUMN]
    scores, pictures = _expected_overlays(project.out / "model" / "detector.pt", images)
    assert with_maps["score"].tolist() == pytest.approx(scores, rel=1e-12)
    assert plain["score"].tolist() == with_maps["score"].tolist()
    _assert_same_pictures(with_maps[MAP_COLUMN].tolist(), pictures)


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


def test_rest_maps_parameter_adds_a_png_per_image(served: tuple[str, list[Path], Any]) -> None:
    url, images, project = served
    rows = {"columns": ["image_b64"], "data": [[encode_image(p)] for p in images]}
    status, body = _post(url, {"dataframe_split": rows, "params": {"maps": True}})
    assert status == 200, body
    predictions = body["predictions"]
    assert [set(p) for p in predictions] == [{*OUTPUT_COLUMNS, MAP_COLUMN}] * len(images)
    scores, pictures = _expected_overlays(project.out / "model" / "detector.pt", images)
    assert [p["score"] for p in predictions] == pytest.approx(scores, rel=1e-12)
    _assert_same_pictures([p[MAP_COLUMN] for p in predictions], pictures)

    for params in ({}, {"params": {"maps": False}}, {"params": {"threshold": "fpr"}}):
        status, body = _post(url, {"dataframe_split": rows, **params})
        assert status == 200, body
        assert [set(p) for p in body["predictions"]] == [set(OUTPUT_COLUMNS)] * len(images)


def test_rest_rejects_a_bad_request(served: tuple[str, list[Path], Any]) -> None:
    url, _, _ = served
    status, body = _post(url, {"dataframe_split": {"columns": ["image_b64"], "data": [["***"]]}})
    assert status >= 400 and "not valid base64" in json.dumps(body)
    # plain `mlflow models serve` too: a JSON answer naming the row, no traceback (issue 12)
    assert (status, body) == (400, {"error_code": "INVALID_PARAMETER_VALUE", "row": 0,
                                    "message": "request row 0: 'image_b64' is not valid base64",
                                    "reason": "'image_b64' is not valid base64"})
