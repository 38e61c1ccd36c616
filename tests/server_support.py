"""Servers for the integration tests whose output goes to a file: a pipe nobody reads
fills up (64 KiB) and stalls a server that logs a lot (MLflow refusing promotion-lock
inserts, moto's request lines, a Prefect worker streaming a flow run)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def logged_server(args: list[str], health_url: str, log: Path,
                  timeout: float = 240) -> Iterator[subprocess.Popen]:
    """Run a server with its output going to ``log`` until the block ends; wait for
    ``health_url`` to answer 200 first (fail with the log's end if it dies or times out)."""
    import signal
    import urllib.request

    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                                env=os.environ.copy(), start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(health_url, timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{args[0]} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
