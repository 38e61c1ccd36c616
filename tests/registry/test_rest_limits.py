"""REST limits (issue 12 item 9): bytes per image and per request (``serve.*``), a 4xx JSON
answer naming the bad row and the reason, and ``nestad serve`` on 127.0.0.1 unless told
otherwise. The scorer alone (no server), the logged pyfunc behind the ASGI app in process,
the CLI's binding, and a real ``nestad serve`` on loopback (integration)."""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from cli_support import assert_one_line_error
from mlflow_support import (
    DATASET,
    bin_path,
    free_port,
    quiet_env,
    registered_project,
    server,
    template_detector,
    write_params,
)
from typer.testing import CliRunner

from components.cli.app import get_app
from components.config import ServeConfig
from components.detector.package import load_detector
from components.pipeline.stages import score_paths
from components.registry.serve import (
    RequestLimits,
    RequestRowError,
    encode_image,
    score_request,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return template_detector(tmp_path_factory)


def test_the_defaults_are_the_documented_ones() -> None:
    defaults = ServeConfig()
    assert (defaults.host, defaults.port) == ("127.0.0.1", 5000)
    assert RequestLimits() == RequestLimits(defaults.max_image_bytes, defaults.max_request_bytes)
    assert (defaults.max_image_bytes, defaults.max_request_bytes) == (64 * 2**20, 256 * 2**20)


def test_an_image_above_the_limit_is_refused_naming_its_row(model) -> None:
    file, images = model
    detector, meta = load_detector(file)
    sizes = [p.stat().st_size for p in images[:3]]
    limit = RequestLimits(max_image_bytes=max(sizes) - 1)
    big = sizes.index(max(sizes))
    frame = pd.DataFrame({"image_b64": [encode_image(p) for p in images[:3]]})
    with pytest.raises(RequestRowError) as caught:
        score_request(detector, meta, frame, limits=limit)
    assert (caught.value.row, caught.value.too_large) == (big, True)
    assert str(caught.value) == (f"request row {big}: 'image_b64' decoded is {max(sizes):,} "
                                 f"bytes, above serve.max_image_bytes={max(sizes) - 1:,}")
    paths = pd.DataFrame({"path": [str(p) for p in images[:3]]})
    with pytest.raises(RequestRowError, match=rf"request row {big}: {images[big]} is "):
        score_request(detector, meta, paths, limits=limit)
    ok = score_request(detector, meta, frame, limits=RequestLimits(max_image_bytes=max(sizes)))
    assert len(ok) == 3  # at the limit exactly: scored


def test_a_request_whose_images_add_up_above_the_limit_names_the_row(model) -> None:
    file, images = model
    detector, meta = load_detector(file)
    sizes = [p.stat().st_size for p in images[:3]]
    limit = RequestLimits(max_request_bytes=sizes[0] + sizes[1] - 1)
    frame = pd.DataFrame({"image_b64": [encode_image(p) for p in images[:3]]})
    with pytest.raises(RequestRowError, match="request row 1: the images up to this row are "
                                              rf"{sizes[0] + sizes[1]:,} bytes, above serve"):
        score_request(detector, meta, frame, limits=limit)


def test_an_undecodable_row_names_its_index(model) -> None:
    detector, meta = load_detector(model[0])
    frame = pd.DataFrame({"image_b64": [encode_image(model[1][0]),
                                        base64.b64encode(b"not an image").decode()]})
    with pytest.raises(RequestRowError) as caught:
        score_request(detector, meta, frame)
    assert caught.value.row == 1 and "not an image file" in caught.value.reason
    assert not caught.value.too_large


# --- the logged pyfunc behind the ASGI app, in process ----------------------------------------


@pytest.fixture(scope="module")
def app_for(tmp_path_factory: pytest.TempPathFactory):
    """``app_for(limits)``: the ASGI app ``nestad serve`` runs, over the session's logged
    model, as a Starlette test client; and the test images and expected scores."""
    import warnings

    import mlflow

    with warnings.catch_warnings():  # starlette 1.x: "use httpx2"; httpx is what is pinned
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from components.registry.rest import build_app

    with quiet_env(tmp_path_factory.mktemp("rest")) as env:
        shared = registered_project(tmp_path_factory)
        project = shared.project
        env.setenv("MLFLOW_TRACKING_URI", project.uri)
        env.setattr(sys, "path", list(sys.path))  # load_model prepends the model code
        loaded = mlflow.pyfunc.load_model(shared.version.model_uri)
        images = sorted((project.root / DATASET / "test").rglob("*.png"))
        expected = score_paths(project.out / "model", images, None)

        def make(limits: RequestLimits) -> TestClient:
            return TestClient(build_app(loaded, limits))

        yield make, images, expected


def _rows(images: list[Path]) -> dict[str, Any]:
    return {"dataframe_split": {"columns": ["image_b64"],
                                "data": [[encode_image(p)] for p in images]}}


def test_app_scores_within_the_limits(app_for) -> None:
    make, images, expected = app_for
    answer = make(RequestLimits()).post("/invocations", json=_rows(images))
    assert answer.status_code == 200, answer.text
    assert [p["score"] for p in answer.json()["predictions"]] == pytest.approx(
        [r["score"] for r in expected], rel=1e-12)


def test_app_refuses_a_large_body_before_reading_it(app_for) -> None:
    make, images, _ = app_for
    body = json.dumps(_rows(images)).encode()
    client = make(RequestLimits(max_request_bytes=len(body) - 1))
    declared = client.post("/invocations", content=body,
                           headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert declared.json() == {
        "error_code": "REQUEST_TOO_LARGE", "row": None,
        "message": f"request: the body declares {len(body):,} bytes (Content-Length), above "
                   f"serve.max_request_bytes={len(body) - 1:,}",
        "reason": f"the body declares {len(body):,} bytes (Content-Length), above "
                  f"serve.max_request_bytes={len(body) - 1:,}"}

    def chunks():  # no Content-Length: counted while it is read
        yield body[: len(body) // 2]
        yield body[len(body) // 2 :]

    streamed = client.post("/invocations", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["error_code"] == "REQUEST_TOO_LARGE"
    assert f"above serve.max_request_bytes={len(body) - 1:,}" in streamed.json()["message"]
    assert client.get("/ping").status_code == 200  # other routes untouched


def test_app_answers_a_large_image_with_413_naming_the_row(app_for) -> None:
    make, images, _ = app_for
    sizes = [p.stat().st_size for p in images[:2]]
    client = make(RequestLimits(max_image_bytes=min(sizes) - 1))
    answer = client.post("/invocations", json=_rows(images[:2]))
    assert answer.status_code == 413, answer.text
    body = answer.json()
    assert body["error_code"] == "REQUEST_TOO_LARGE" and body["row"] == 0
    assert body["reason"] == (f"'image_b64' decoded is {sizes[0]:,} bytes, above "
                              f"serve.max_image_bytes={min(sizes) - 1:,}")
    assert body["message"] == f"request row 0: {body['reason']}"


@pytest.mark.parametrize(("cell", "reason"), [("***", "'image_b64' is not valid base64"),
                                              (base64.b64encode(b"GIF89a...").decode(),
                                               "not an image file")])
def test_app_answers_a_bad_row_with_400_naming_it(app_for, cell: str, reason: str) -> None:
    make, images, _ = app_for
    rows = _rows(images[:2])
    rows["dataframe_split"]["data"].append([cell])
    answer = make(RequestLimits()).post("/invocations", json=rows)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and body["row"] == 2
    assert reason in body["reason"] and body["message"].startswith("request row 2: ")
    assert "Traceback" not in answer.text


# --- nestad serve: the CLI ----------------------------------------------------------------------


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What ``nestad serve`` would run uvicorn with (no model loaded, no server started)."""
    import uvicorn

    from components.registry import rest

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(rest, "load_served_model", lambda uri, params, root: uri)
    monkeypatch.setattr(rest, "build_app", lambda model, limits: (model, limits))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    return calls


def _serve(tmp_path: Path, *args: str):
    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  max_image_bytes: 1000\n")
    return CliRunner().invoke(get_app(), ["serve", "-p", str(params), *args])


def test_serve_binds_loopback_unless_told_otherwise(started, tmp_path) -> None:
    result = _serve(tmp_path)
    assert result.exit_code == 0, result.output
    (call,) = started
    assert (call["host"], call["port"]) == ("127.0.0.1", 5000)
    uri, limits = call["app"]
    assert uri == "models:/nestad-detector@production"
    assert limits == RequestLimits(max_image_bytes=1000, max_request_bytes=256 * 2**20)
    assert "http://127.0.0.1:5000/invocations" in result.output
    result = _serve(tmp_path, "models:/other/3", "--host", "0.0.0.0", "--port", "8080")
    assert result.exit_code == 0, result.output
    assert (started[1]["host"], started[1]["port"], started[1]["app"][0]) == (
        "0.0.0.0", 8080, "models:/other/3")


def test_serve_refuses_a_bad_port_naming_the_option(started, tmp_path) -> None:
    assert_one_line_error(_serve(tmp_path, "--port", "0"), "--port 0: serve.port")
    assert started == []


def test_serve_refuses_what_is_not_a_model(tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = CliRunner().invoke(get_app(), ["serve", str(tmp_path), "-p", str(params)])
    assert_one_line_error(result, f"{tmp_path}: not a model")


# --- a real nestad serve on loopback ------------------------------------------------------------


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.integration
def test_nestad_serve_answers_on_loopback_within_its_limits(tmp_path_factory) -> None:
    with quiet_env(tmp_path_factory.mktemp("nestad-serve")):
        shared = registered_project(tmp_path_factory)
        project = shared.project
        images = sorted((project.root / DATASET / "test").rglob("*.png"))
        body = json.dumps(_rows(images)).encode()
        params = write_params(project, name="serve-params.yaml", tracking_uri=project.uri)
        port = free_port()
        command = [bin_path("nestad"), "serve", f"models:/nestad-detector/{shared.version.version}",
                   "-p", str(params), "--port", str(port),
                   "-s", f"serve.max_request_bytes={len(body) - 1}"]
        with server(command, f"http://127.0.0.1:{port}/ping", timeout=120):
            url = f"http://127.0.0.1:{port}"
            status, answer = _post(url, json.dumps(_rows(images[:2])).encode())
            assert status == 200 and len(answer["predictions"]) == 2, answer
            status, answer = _post(url, body)
            assert status == 413 and answer["error_code"] == "REQUEST_TOO_LARGE", answer
            bad = _rows(images[:1])
            bad["dataframe_split"]["data"].append(["***"])
            status, answer = _post(url, json.dumps(bad).encode())
            assert (status, answer["row"]) == (400, 1), answer
