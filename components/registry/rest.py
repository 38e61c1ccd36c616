"""``nestad serve``: the registered pyfunc behind MLflow's scoring server, with limits.

MLflow's scoring server (``mlflow.pyfunc.scoring_server``, FastAPI) answers ``/invocations``
as ``mlflow models serve`` does; in front of it a small ASGI layer refuses a body above
``serve.max_request_bytes`` (from ``Content-Length`` before reading, else while reading)
with HTTP 413, and the model refuses each image above ``serve.max_image_bytes`` before
decoding it (``components.registry.serve``). A refused request gets a JSON answer::

    {"error_code": "REQUEST_TOO_LARGE" | "INVALID_PARAMETER_VALUE",
     "message": "request row 3: ...", "row": 3, "reason": "..."}

(``row`` is null when the request as a whole is at fault). The server listens on
``serve.host``: 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from components.config import Params, ServeConfig
from components.errors import DataError
from components.registry.client import RegistryError, _errors, _mlflow, open_registry
from components.registry.serve import RequestLimits, RequestRowError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

TOO_LARGE = "REQUEST_TOO_LARGE"
INVALID = "INVALID_PARAMETER_VALUE"


def limits_of(cfg: ServeConfig) -> RequestLimits:
    return RequestLimits(max_image_bytes=cfg.max_image_bytes,
                         max_request_bytes=cfg.max_request_bytes)


def error_body(exc: DataError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body for a request the scorer refuses."""
    if isinstance(exc, RequestRowError):
        status = 413 if exc.too_large else 400
        return status, {"error_code": TOO_LARGE if exc.too_large else INVALID,
                        "message": str(exc), "row": exc.row, "reason": exc.reason}
    return 400, {"error_code": INVALID, "message": str(exc), "row": None, "reason": str(exc)}


def rest_error(exc: DataError) -> Exception:
    """An ``MlflowException`` the scoring server answers with ``error_body``'s status and
    JSON (not the generic "unexpected error" and a traceback it gives other exceptions)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    status, body = error_body(exc)

    class RequestRefused(MlflowException):
        def serialize_as_json(self) -> str:
            return json.dumps(body)

        def get_http_status_code(self) -> int:
            return status

    return RequestRefused(body["message"], error_code=INVALID_PARAMETER_VALUE)


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _too_large(size: int, limits: RequestLimits, read: bool) -> dict[str, Any]:
    what = f"is {size:,} bytes" if read else f"declares {size:,} bytes (Content-Length)"
    reason = f"the body {what}, above serve.max_request_bytes={limits.max_request_bytes:,}"
    return {"error_code": TOO_LARGE, "message": f"request: {reason}", "row": None,
            "reason": reason}


def limit_body(inner: App, limits: RequestLimits) -> App:
    """ASGI middleware: ``/invocations`` bodies above ``limits.max_request_bytes`` get 413
    before ``inner`` sees them; a body is read at most to the limit."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            await inner(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        if declared > limits.max_request_bytes:
            await _answer(send, 413, _too_large(declared, limits, read=False))
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limits.max_request_bytes:
                await _answer(send, 413, _too_large(total, limits, read=True))
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await inner(scope, replay, send)

    return app


def build_app(model: Any, limits: RequestLimits) -> App:
    """The ASGI app serving a loaded nestad pyfunc ``model`` under ``limits``."""
    from mlflow.pyfunc import scoring_server

    try:
        python_model = model.unwrap_python_model()
    except Exception:  # not a python_model flavour: not a nestad detector
        python_model = None
    if not hasattr(python_model, "detector"):
        raise RegistryError("the model is not a nestad detector (no NestadDetectorModel "
                            "inside); serve it with `mlflow models serve`")
    python_model.limits = limits  # read by predict for every request
    return limit_body(scoring_server.init(model), limits)


def load_served_model(uri: str, params: Params, root: Path) -> Any:
    """Load ``uri`` (``models:/...`` from the registry ``registry.*`` names, or a local
    MLflow model folder) as a pyfunc."""
    local = Path(uri).expanduser()
    if not uri.startswith("models:/") and not (local / "MLmodel").is_file():
        raise RegistryError(f"{uri}: not a model (expected models:/<name>@<alias>, "
                            "models:/<name>/<version> or a folder holding an MLmodel file)")
    reg = open_registry(params.registry, root)
    mlflow = _mlflow(reg.cfg)
    with _errors(reg, f"loading {uri}"):
        return mlflow.pyfunc.load_model(uri if uri.startswith("models:/") else str(local))


def serve_model(uri: str, params: Params, root: Path,
                announce: Callable[[str], None] = print) -> None:
    """Serve ``uri`` on ``serve.host:serve.port`` until interrupted."""
    import uvicorn

    app = build_app(load_served_model(uri, params, root), limits_of(params.serve))
    cfg = params.serve
    announce(f"serving {uri} on http://{cfg.host}:{cfg.port}/invocations "
             f"(max {cfg.max_image_bytes:,} bytes per image, {cfg.max_request_bytes:,} per "
             "request); Ctrl+C stops it")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
