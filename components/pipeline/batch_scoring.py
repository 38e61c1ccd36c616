"""Batch scoring in chunks: list the images (local files, folders, ``s3://bucket/prefix``),
score one chunk, write the rows. No Prefect here: ``flows/scoring.py`` maps
``score_chunk`` over a Dask cluster and merges what comes back.

A chunk never fails as a whole for one bad image: an image that cannot be read, downloaded
or decoded is a row with its ``error`` and empty figures. Scores are those of ``nestad
score`` (``stages.score_paths``): the same model file, decoding rules and detector.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from components.config import IngestConfig
from components.data.images import decode_image, to_model_input
from components.data.layout import IMAGE_SUFFIXES
from components.data.splits import image_files
from components.detector.package import load_detector
from components.errors import DataError, NestadError

COLUMNS = ("path", "score", "normalised_score", "is_anomaly", "error")


@dataclass(frozen=True)
class ImageRef:
    """One image to score: a local path or ``s3://bucket/key`` (what its row names), with
    the size and ETag the S3 listing gave (checked on download)."""

    path: str
    size: int | None = None
    etag: str | None = None


def is_s3(source: str) -> bool:
    return str(source).startswith("s3://")


def list_images(sources: Iterable[str | Path], s3: IngestConfig | None = None) -> list[ImageRef]:
    """Every image the sources name, in a stable order: each source in turn, a folder's or
    prefix's image files sorted (hidden files and other suffixes skipped), as ``nestad
    score`` lists them. An empty folder or prefix, or a missing path, is a DataError."""
    refs: list[ImageRef] = []
    for source in sources:
        if is_s3(str(source)):
            refs.extend(_list_s3(str(source), s3 or IngestConfig()))
            continue
        refs.extend(ImageRef(str(f)) for f in image_files([Path(source)]))
    return refs


def _list_s3(uri: str, cfg: IngestConfig) -> list[ImageRef]:
    from components.data.sources.s3 import _S3Source

    source = _S3Source(uri, cfg, None)
    base = f"s3://{source.bucket}/{source.prefix}"
    entries = sorted((e for e in source.entries()
                      if PurePosixPath(e.rel).suffix.lower() in IMAGE_SUFFIXES),
                     key=lambda e: e.where)
    if not entries:
        raise DataError(f"{uri}: no image files under this prefix")
    return [ImageRef(base + e.where, e.size, e.ref) for e in entries]


def chunked(refs: list[ImageRef], size: int) -> list[list[ImageRef]]:
    """``refs`` in consecutive chunks of at most ``size`` (order kept)."""
    if size < 1:
        raise NestadError(f"chunk size must be at least 1, not {size}")
    return [refs[i : i + size] for i in range(0, len(refs), size)]


@functools.lru_cache(maxsize=4)
def _detector(model: str, mtime: float, threshold: str | None) -> tuple[Any, dict]:
    """One detector per model file and threshold per process (a worker scores many chunks)."""
    detector, meta = load_detector(Path(model))
    if threshold:
        detector.threshold.fill_(meta["norm"].threshold(threshold))
    return detector, meta


def load_scorer(model: Path, threshold: str | None = None) -> tuple[Any, dict]:
    """The detector and metadata of ``model`` (a file or a run folder's model/ directory)."""
    from components.detector.package import MODEL_FILE

    file = Path(model) / MODEL_FILE if Path(model).is_dir() else Path(model)
    try:
        mtime = file.stat().st_mtime
    except OSError:
        mtime = 0.0  # load_detector names the missing file
    return _detector(str(file), mtime, threshold)


def _read(refs: list[ImageRef], s3: IngestConfig | None) -> list[bytes | DataError]:
    """Each image's bytes, or the DataError saying why not (downloads in parallel)."""
    clients: dict[str, Any] = {}

    def get(ref: ImageRef) -> bytes | DataError:
        try:
            if not is_s3(ref.path):
                try:
                    return Path(ref.path).read_bytes()
                except OSError as exc:
                    raise DataError(f"{ref.path}: cannot read ({exc.strerror})") from None
            from components.data.sources.base import _Entry

            bucket, _, key = ref.path.removeprefix("s3://").partition("/")
            source = clients[bucket]
            return source._get(_Entry(key, ref.size or 0, ref.etag))
        except DataError as exc:
            return exc

    remote = {r.path.removeprefix("s3://").partition("/")[0] for r in refs if is_s3(r.path)}
    if remote:
        from components.data.sources.s3 import _S3Source, make_s3_client

        cfg = s3 or IngestConfig()
        client = make_s3_client(cfg)
        clients = {b: _S3Source(f"s3://{b}", cfg, client) for b in remote}
        with ThreadPoolExecutor(min(cfg.s3_workers, len(refs))) as pool:
            return list(pool.map(get, refs))
    return [get(r) for r in refs]


def score_chunk(model: Path, refs: list[ImageRef], threshold: str | None = None,
                s3: IngestConfig | None = None, batch_size: int = 64) -> list[dict]:
    """Score one chunk: a row per image of ``refs``, in their order (``COLUMNS``); an image
    that cannot be read or decoded gets its error instead of figures."""
    import torch

    detector, meta = load_scorer(model, threshold)
    size, channels, rules = meta["image_size"], meta["channels"], meta.get("image_rules")
    rows: list[dict] = []
    good: list[tuple[int, Any]] = []  # (row index, (H, W, C) uint8)
    for ref, data in zip(refs, _read(refs, s3), strict=True):
        row = {"path": ref.path, "score": None, "normalised_score": None,
               "is_anomaly": None, "error": None}
        if isinstance(data, DataError):
            row["error"] = str(data)
        else:
            try:
                good.append((len(rows), decode_image(data, ref.path, size, channels, rules)[0]))
            except DataError as exc:
                row["error"] = str(exc)
        rows.append(row)
    for start in range(0, len(good), batch_size):
        part = good[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([p for _, p in part]))
        x = to_model_input(pixels.permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        with torch.no_grad():
            score, normed, flagged = detector(x)
        for j, (i, _) in enumerate(part):
            rows[i].update(score=float(score[j]), normalised_score=float(normed[j]),
                           is_anomaly=bool(flagged[j]))
    return rows


def write_rows(rows: list[dict], out: Path) -> Path:
    """Write the rows (``COLUMNS``) to ``out``: Parquet for a ``.parquet`` name, else CSV."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pandas as pd

        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        frame["is_anomaly"] = frame["is_anomaly"].astype("boolean")
        frame.to_parquet(out, index=False)
        return out
    with out.open("w", newline="") as fh:
        write_csv(rows, fh)
    return out


def write_csv(rows: list[dict], fh: Any) -> None:
    """The rows as CSV (``COLUMNS``; empty figures for an error row) to an open file."""
    writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
