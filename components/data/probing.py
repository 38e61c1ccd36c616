"""Decoding once, at ingestion: probe every image and store its bytes content-addressed
(``images/<sha[:2]>/<sha256>.<ext>``), on worker processes for large sources."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from components.data.images import ImageProbe, ImageRules, probe_image

IMAGES_DIR = "images"
_CHUNK = 256  # images per task sent to a decode worker
_POOL_MIN_IMAGES = 4096  # below this, decoding inline beats starting worker processes


def image_path(sha256: str, suffix: str) -> str:
    """Where an image with this content lives inside a dataset folder."""
    return f"{IMAGES_DIR}/{sha256[:2]}/{sha256}{suffix}"


def _write_new(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` (its folder too, on first use). Plain os calls: this
    runs 60,000 times for CIFAR-10, where io.open and pathlib cost more than the disk."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _probe_and_store(batch: list[tuple[str, bytes]], root: str | None,
                     rules: ImageRules | None = None) -> list[ImageProbe]:
    """Decode each image by ``rules``; write the accepted ones under ``root`` (worker-process
    safe)."""
    probes = []
    for sha, data in batch:
        probe = probe_image(data, rules)
        if probe.error is None and root is not None:
            _write_new(os.path.join(root, image_path(sha, probe.suffix)), data)
        probes.append(probe)
    return probes


class _Decoder:
    """Feeds batches to worker processes (or decodes inline) and returns results in order.

    Workers are forked, so they start instantly with nothing to re-import. Forking a
    process that runs other threads can deadlock the child, so a pool is used only when
    this thread is the process's only one (true for the CLI); else decoding is inline.
    """

    def __init__(self, root: Path | None, workers: int, expected: int,
                 rules: ImageRules | None = None) -> None:
        self.root = str(root) if root is not None else None
        self.rules = rules  # None: the config defaults (components.data.images)
        use_pool = (
            workers > 1
            and expected >= _POOL_MIN_IMAGES
            and threading.active_count() == 1
            and "fork" in multiprocessing.get_all_start_methods()
        )
        self.pool = None
        if use_pool:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            self.pool.submit(int).result()  # fork every worker now, before S3 threads start
        self.limit = 3 * workers
        self.chunk = _CHUNK  # images per batch; callers submit batches of this size
        self.pending: deque[tuple[list[Any], Future[list[ImageProbe]] | list[ImageProbe]]] = deque()

    def submit(
        self, keys: list[Any], batch: list[tuple[str, bytes]]
    ) -> Iterator[tuple[Any, ImageProbe]]:
        """Queue one batch; yield results of batches that are done, oldest first."""
        if self.pool is None:
            self.pending.append((keys, _probe_and_store(batch, self.root, self.rules)))
        else:
            self.pending.append(
                (keys, self.pool.submit(_probe_and_store, batch, self.root, self.rules))
            )
        while len(self.pending) > self.limit or (self.pool is None and self.pending):
            yield from self._pop()

    def drain(self) -> Iterator[tuple[Any, ImageProbe]]:
        while self.pending:
            yield from self._pop()

    def _pop(self) -> Iterator[tuple[Any, ImageProbe]]:
        keys, result = self.pending.popleft()
        probes = result if isinstance(result, list) else result.result()
        yield from zip(keys, probes, strict=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def probe_images(
    items: Iterable[tuple[Any, bytes]], workers: int = 2, expected: int = 0,
    rules: ImageRules | None = None,
) -> Iterator[tuple[Any, ImageProbe]]:
    """Decode ``(key, bytes)`` items by ``rules`` without storing them; yields ``(key,
    probe)`` in input order. ``expected`` (the item count, if known) decides whether worker
    processes pay."""
    decoder = _Decoder(None, workers, expected, rules)
    try:
        keys: list[Any] = []
        batch: list[tuple[str, bytes]] = []
        for name, data in items:
            keys.append(name)
            batch.append(("", data))
            if len(batch) == decoder.chunk:
                yield from decoder.submit(keys, batch)
                keys, batch = [], []
        if batch:
            yield from decoder.submit(keys, batch)
        yield from decoder.drain()
    finally:
        decoder.close()
