"""``nestad score`` in parallel (``--workers N``, ``--dask-address``, or an ``s3://`` source):
the checks and the output here; the scoring itself is the batch scoring flow, which
``flows.cli`` (the console script, the layer that may import Prefect) plugs in with
``set_batch_scorer``. Components never import Prefect."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.cli.common import console
from components.errors import NestadError

_scorer: list[Callable[..., Any]] = []


def set_batch_scorer(fn: Callable[..., Any]) -> None:
    """Plug in the parallel scorer: ``fn(sources, model, output, threshold, workers,
    address, chunk_size)`` returning a report with ``rows``, ``failed`` and ``flagged``."""
    _scorer[:] = [fn]


def source_of(path: Path | str) -> str:
    """The source string: ``Path("s3://b/p")`` collapses to ``s3:/b/p``; undo that."""
    text = str(path)
    if text.startswith("s3:/") and not text.startswith("s3://"):
        return "s3://" + text[4:]
    return text


def wants_parallel(paths: list[Path], workers: int | None, address: str | None) -> bool:
    return workers is not None or address is not None or any(
        source_of(p).startswith("s3://") for p in paths)


def score_batch(paths: list[Path], model: Path, output: Path | None, threshold: str | None,
                workers: int | None, address: str | None, chunk_size: int,
                refused: dict[str, object]) -> None:
    """Score in parallel; ``refused``: options the parallel path does not take (name ->
    value, refused when set)."""
    from components.pipeline.batch_scoring import write_csv

    for option, value in refused.items():
        if value:
            raise NestadError(f"{option} is not available with --workers, --dask-address or "
                              "an s3:// source (score without them)")
    if workers is not None and workers < 1:
        raise NestadError(f"--workers: {workers} is not at least 1")
    if chunk_size < 1:
        raise NestadError(f"--chunk-size: {chunk_size} is not at least 1")
    if not _scorer:
        raise NestadError("parallel scoring runs as a Prefect flow: use the `nestad` "
                          "console script (flows.cli)")
    report = _scorer[0]([source_of(p) for p in paths], model, output, threshold,
                        workers or 2, address, chunk_size)
    if output is None:
        write_csv(report.rows, sys.stdout)
        return
    console.print(f"scored {len(report.rows)} images ({report.failed} errors), "
                  f"{report.flagged} flagged anomalous -> {output}")
