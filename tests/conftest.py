"""Shared fixtures: tiny synthetic image datasets and tiny params (helpers in
``synthetic_support``), a torch thread setting, and a moto S3 server."""


from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from synthetic_support import (
    CLASSES,
    DEFECT,
    REPO,
    build_tiny_params,
    pack_archive,
    synthetic_batch,
    synthetic_image,
    synthetic_image_set,
    tiny_overrides,
    write_dataset,
    write_images,
)

from components.config import Params


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine the
    OpenMP barriers of a second thread can make each step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _dvc_logs_to_the_session_streams() -> None:
    """``import dvc`` binds DVC's log handlers to the ``sys.stdout``/``stderr`` of that
    moment. Imported first inside a ``CliRunner`` (tests/data/test_ingest.py runs before
    the pipeline tests), they would write to the runner's buffers, closed when it returns,
    and every later DVC call in the session would fail to log. Import it here first."""
    import dvc  # noqa: F401


@pytest.fixture(scope="session")
def tiny_params() -> Callable[..., Params]:
    return build_tiny_params


@pytest.fixture(scope="session")
def synth() -> SimpleNamespace:
    """The helpers above, for tests: ``synth.image``, ``synth.batch``, ``synth.image_set``,
    ``synth.write_images``, ``synth.dataset``, ``synth.pack``, ``synth.overrides`` and the
    constants."""
    return SimpleNamespace(
        image=synthetic_image,
        batch=synthetic_batch,
        image_set=synthetic_image_set,
        write_images=write_images,
        dataset=write_dataset,
        pack=pack_archive,
        overrides=tiny_overrides,
        classes=CLASSES,
        defect=DEFECT,
        repo=REPO,
    )


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(layout, name=..., **sizes)`` writes a dataset under tmp_path."""

    def make(layout: str, name: str | None = None, **kwargs: Any) -> Path:
        return write_dataset(tmp_path / (name or layout), layout, **kwargs)

    return make


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's standalone server) on a free 127.0.0.1 port for
    the length of one test module; its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("moto_server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials for the moto server, and no profile or endpoint from outside."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
