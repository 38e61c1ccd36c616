"""Parallel batch scoring: list the images, score chunks in parallel on Dask, write one file.

The task runner is prefect-dask's ``DaskTaskRunner``: by default a local Dask cluster of
``workers`` threaded workers in this process (torch and Pillow release the GIL, and a
threaded cluster shares this process's Prefect API, embedded or not), or the scheduler at
``dask_address`` (``tcp://host:8786``), whose workers must reach the model file's path,
the images (a shared folder or S3) and the Prefect API (``PREFECT_API_URL``).

Rows come back in the listing order (``components.pipeline.batch_scoring.list_images``),
whatever order the chunks finish in. A chunk that fails as a whole (a worker lost, after
its retry) becomes error rows for its images; the batch is still written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.config import IngestConfig
from components.pipeline.batch_scoring import (
    ImageRef,
    chunked,
    list_images,
    load_scorer,
    score_chunk,
    write_rows,
)


@dataclass(frozen=True)
class BatchScoringReport:
    """What one batch scoring run did (``rows`` in the listing order)."""

    rows: list[dict]
    output: Path | None
    chunks: int
    workers: int | None
    address: str | None

    @property
    def failed(self) -> int:
        return sum(r["error"] is not None for r in self.rows)

    @property
    def flagged(self) -> int:
        return sum(bool(r["is_anomaly"]) for r in self.rows)


@task(name="score-chunk", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def score_task(model: str, refs: list[ImageRef], threshold: str | None,
               s3: IngestConfig) -> list[dict]:
    """Download, decode and score one chunk; a bad image is an error row."""
    return score_chunk(Path(model), refs, threshold, s3)


@flow(name="batch-scoring", log_prints=True)
def batch_scoring_flow(sources: list[str], model: str, output: str | None = None,
                       threshold: str | None = None, chunk_size: int = 64,
                       s3: IngestConfig | None = None) -> BatchScoringReport:
    """Score every image the sources name with ``model``; one row per image, in order."""
    s3 = s3 or IngestConfig()
    load_scorer(Path(model), threshold)  # a bad model file fails here, before any work
    # Listed in the flow itself (botocore retries the requests): a bad source is one clear
    # error from the flow, before any task runs.
    refs = list_images(sources, s3)
    chunks = chunked(refs, chunk_size)
    futures = [score_task.submit(model, c, threshold, s3) for c in chunks]
    rows: list[dict] = []
    for chunk, future in zip(chunks, futures, strict=True):
        try:
            rows.extend(future.result())
        except Exception as exc:  # noqa: BLE001 - the chunk is lost; its images are not
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            rows.extend({"path": r.path, "score": None, "normalised_score": None,
                         "is_anomaly": None, "error": f"chunk failed: {reason}"} for r in chunk)
    out = write_rows(rows, Path(output)) if output else None
    failed = sum(r["error"] is not None for r in rows)
    print(f"scored {len(rows) - failed} of {len(rows)} images in {len(chunks)} chunks"
          + (f"; {failed} errors" if failed else "") + (f" -> {out}" if out else ""))
    return BatchScoringReport(rows, out, len(chunks), None, None)


def dask_runner(workers: int = 2, address: str | None = None):  # -> DaskTaskRunner
    """The task runner: the Dask scheduler at ``address``, else a local threaded cluster
    of ``workers`` single-thread workers."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": False, "dashboard_address": None})


def score_in_parallel(sources: list[str], model: Path, output: Path | None,
                      threshold: str | None = None, workers: int = 2,
                      address: str | None = None, chunk_size: int = 64,
                      s3: IngestConfig | None = None) -> BatchScoringReport:
    """Run the batch scoring flow on a Dask task runner (what ``nestad score --workers``
    and ``nestad score s3://...`` call)."""
    import torch

    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
        os.environ.setdefault(key, value)
    threads = torch.get_num_threads()
    if not address:  # the local workers share this process's cores: no oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        flow_ = batch_scoring_flow.with_options(task_runner=dask_runner(workers, address))
        report = flow_(sources=[str(s) for s in sources], model=str(model),
                       output=str(output) if output else None, threshold=threshold,
                       chunk_size=chunk_size, s3=s3)
    finally:
        torch.set_num_threads(threads)
    return BatchScoringReport(report.rows, report.output, report.chunks,
                              None if address else workers, address)
