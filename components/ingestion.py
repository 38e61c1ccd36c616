"""Versioned dataset ingestion: a source becomes ``<data_root>/<name>/`` with a manifest.

Sources: a folder; a ``.tar``/``.tar.gz``/``.zip`` archive (every member is checked before
anything is written); the original CIFAR-10 python archive (pickled batches, read with a
numpy-only unpickler); ``s3://bucket/prefix`` (boto3, standard credential chain). The
source layout (``classes`` or ``industrial``), anomalous class, seed and val_fraction come
from ``DataConfig``, so the split is the one ``components.data`` defines.

The dataset folder, which ``components.data.load_splits`` reads through its manifest::

    manifest.csv                       MANIFEST_COLUMNS, one row per image, sorted by path
    images/<sha[:2]>/<sha256>.<ext>    the source's bytes, unchanged; ext from the content
    ingest.json                        the split protocol, and which manifest was decoded

Images are content-addressed: an exact duplicate is stored once and an image never moves.
Re-ingesting adds only unseen sha256s and never changes an existing row. Each run builds
the new version in a temporary folder beside the target (existing files hard-linked, not
copied) and swaps it in with two renames, so a failure part-way leaves the previous
version as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import stat
import tarfile
import threading
import time
import uuid
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.config import DataConfig, IngestConfig
from components.data import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    NORMAL_LABEL,
    SPLITS,
    LayoutRecord,
    assign_split,
    check_no_empty_class_folders,
    is_archive,
    is_hidden,
    parse_layout,
    read_manifest,
    sha256_hex,
    strip_to_layout_root,
)
from components.errors import DataError

log = logging.getLogger(__name__)

RECORD_NAME = "ingest.json"
IMAGES_DIR = "images"
Progress = Callable[[int], None]

_CHUNK = 256  # images per task sent to a decode worker
_POOL_MIN_IMAGES = 4096  # below this, decoding inline beats starting worker processes
_FORMAT_SUFFIX = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "PPM": ".ppm",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "GIF": ".gif",
}


@dataclass(frozen=True)
class IngestReport:
    """What one ingestion did. ``changed`` is False when nothing new was found: the
    dataset on disk was then left untouched."""

    dataset: Path
    source: str
    added: dict[str, int]  # new images per split
    totals: dict[str, int]  # images per split in the dataset now
    seen: int  # images read from the source
    duplicates: int  # source images whose bytes were already stored or repeated
    conflicts: tuple[str, ...]  # duplicates labelled differently from the kept copy
    skipped: tuple[str, ...]  # undecodable images left out (on_bad_image=skip)
    changed: bool
    seconds: float

    @property
    def images_added(self) -> int:
        return sum(self.added.values())


@dataclass(frozen=True)
class ImageProbe:
    """One full decode: the image's own size and band count, or why it failed."""

    width: int = 0
    height: int = 0
    channels: int = 0
    suffix: str = ""
    error: str | None = None


# ----------------------------------------------------------------------------------------
# Sources: a header-only listing first (checked, nothing written), then the bytes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    rel: str  # POSIX path inside the source
    size: int
    ref: Any = field(default=None, compare=False)  # TarInfo, ZipInfo, Path or S3 ETag
    origin: str | None = None  # where it really came from, when ``rel`` is synthesised

    @property
    def where(self) -> str:
        return self.origin or self.rel


class _Source(Protocol):
    uri: str

    def entries(self) -> list[_Entry]: ...

    def read(self, entries: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]: ...

    def close(self) -> None: ...


class _Limits:
    """Counts members and bytes while listing; refuses the source at the first excess."""

    def __init__(self, cfg: IngestConfig, uri: str) -> None:
        self.cfg, self.uri, self.count, self.total = cfg, uri, 0, 0

    def add(self, name: str, size: int) -> None:
        self.count += 1
        if self.count > self.cfg.max_members:
            raise DataError(
                f"{self.uri}: more than {self.cfg.max_members:,} members; refused "
                "(raise ingest.max_members if this is expected)"
            )
        if size > self.cfg.max_member_bytes:
            raise DataError(
                f"{self.uri}: member {name!r} is {size:,} bytes, over "
                f"ingest.max_member_bytes={self.cfg.max_member_bytes:,}; refused"
            )
        self.total += size
        if self.total > self.cfg.max_total_bytes:
            raise DataError(
                f"{self.uri}: members total more than ingest.max_total_bytes="
                f"{self.cfg.max_total_bytes:,} bytes; refused"
            )


_DRIVE = re.compile(r"^[A-Za-z]:")


def _safe_member_name(name: str, uri: str) -> str:
    """The member's normalised relative path ("" for the root itself, e.g. ``./``);
    absolute paths and ``..`` are refused."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise DataError(f"{uri}: member {name!r} has an absolute path; refused")
    if ".." in re.split(r"[/\\]", name):
        raise DataError(f"{uri}: member {name!r} climbs out of the archive ('..'); refused")
    return "/".join(part for part in name.split("/") if part not in ("", "."))  # ./a//b -> a/b


class _UniqueNames:
    def __init__(self, uri: str) -> None:
        self.uri, self.seen = uri, set[str]()

    def add(self, rel: str) -> None:
        if not rel:
            raise DataError(f"{self.uri}: a file member with an empty name; refused")
        if rel in self.seen:
            raise DataError(f"{self.uri}: member {rel!r} appears twice; refused")
        self.seen.add(rel)


class _FolderSource:
    def __init__(self, path: Path, cfg: IngestConfig) -> None:
        self.path, self.cfg, self.uri = path, cfg, str(path)

    def entries(self) -> list[_Entry]:
        check_no_empty_class_folders(self.path)
        limits, out = _Limits(self.cfg, self.uri), []
        for dirpath, dirnames, filenames in os.walk(self.path):
            base = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in dirnames:
                if (base / name).is_symlink():
                    raise DataError(
                        f"{base / name}: symbolic link to a folder; pass the real folder instead"
                    )
            for name in sorted(filenames):
                file = base / name
                rel = file.relative_to(self.path).as_posix()
                if is_hidden(rel):
                    continue
                try:
                    info = file.stat()
                except OSError as exc:
                    raise DataError(f"{file}: cannot read ({exc.strerror})") from None
                if not stat.S_ISREG(info.st_mode):
                    raise DataError(f"{file}: not a regular file; refused")
                limits.add(rel, info.st_size)
                out.append(_Entry(rel, info.st_size, file))
        return out

    def read(self, entries: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        for entry in entries:
            try:
                yield entry, entry.ref.read_bytes()
            except OSError as exc:
                raise DataError(f"{entry.ref}: cannot read ({exc.strerror})") from None

    def close(self) -> None:
        pass


class _TarSource:
    def __init__(self, path: Path, cfg: IngestConfig) -> None:
        self.cfg, self.uri = cfg, str(path)
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 -- closed by close()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a readable tar archive ({exc})") from None

    def entries(self) -> list[_Entry]:
        limits, names, out = _Limits(self.cfg, self.uri), _UniqueNames(self.uri), []
        while True:
            try:
                member = self._tar.next()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise DataError(f"{self.uri}: not a readable tar archive ({exc})") from None
            if member is None:
                return out
            rel = _safe_member_name(member.name, self.uri)
            what = _tar_refusal(member)
            if what:
                raise DataError(f"{self.uri}: member {member.name!r} is {what}; refused")
            limits.add(rel, member.size)
            if member.isdir():
                continue
            names.add(rel)
            if not is_hidden(rel):
                out.append(_Entry(rel, member.size, member))

    def read(self, entries: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        # Straight from the (decompressed) stream: extractfile() costs ~50 us a member.
        stream = self._tar.fileobj
        assert stream is not None
        for entry in entries:
            try:
                stream.seek(entry.ref.offset_data)
                data = stream.read(entry.size)
            except (OSError, EOFError, zlib.error) as exc:
                raise DataError(f"{self.uri}: {entry.rel}: unreadable ({exc})") from None
            if len(data) != entry.size:
                raise DataError(f"{self.uri}: {entry.rel}: truncated archive member")
            yield entry, data

    def close(self) -> None:
        self._tar.close()


def _tar_refusal(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    if not (member.isfile() or member.isdir()):
        return f"of unsupported type {member.type!r}"
    return None


class _ZipSource:
    def __init__(self, path: Path, cfg: IngestConfig) -> None:
        self.cfg, self.uri = cfg, str(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{path}: not a readable zip archive ({exc})") from None

    def entries(self) -> list[_Entry]:
        limits, names, out = _Limits(self.cfg, self.uri), _UniqueNames(self.uri), []
        for info in self._zip.infolist():
            rel = _safe_member_name(info.filename, self.uri)
            mode = info.external_attr >> 16  # Unix mode, when the archiver recorded one
            what = None
            if stat.S_ISLNK(mode):
                what = "a symbolic link"
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                what = "a device file"
            elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                what = "a FIFO or socket"
            elif info.flag_bits & 0x1:
                what = "encrypted"
            if what:
                raise DataError(f"{self.uri}: member {info.filename!r} is {what}; refused")
            limits.add(rel, info.file_size)
            if info.is_dir():
                continue
            names.add(rel)
            if not is_hidden(rel):
                out.append(_Entry(rel, info.file_size, info))
        return out

    def read(self, entries: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        for entry in entries:
            try:
                data = self._zip.read(entry.ref)  # stops at the declared size; CRC checked
            except (zipfile.BadZipFile, OSError, zlib.error, RuntimeError) as exc:
                raise DataError(f"{self.uri}: {entry.rel}: unreadable ({exc})") from None
            yield entry, data

    def close(self) -> None:
        self._zip.close()


# ---------------------------------------------------------------------------- S3 -------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DataError(f"{uri}: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_s3_client(cfg: IngestConfig) -> Any:
    """A boto3 S3 client: credentials from the standard AWS chain, botocore retries."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": cfg.s3_retry_mode, "total_max_attempts": cfg.s3_max_attempts},
        max_pool_connections=max(10, cfg.s3_workers),
        connect_timeout=cfg.s3_timeout_s,
        read_timeout=cfg.s3_timeout_s,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=cfg.s3_endpoint_url, region_name=cfg.s3_region, config=config
    )


def _s3_error(uri: str, action: str, exc: Exception) -> DataError:
    """A one-line error; never includes credentials (botocore messages carry none)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return DataError(
            f"{uri}: no AWS credentials found (set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance role)"
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return DataError(f"{uri}: {action} failed ({err.get('Code', '?')}: {exc})")
    return DataError(f"{uri}: {action} failed ({exc})")


class _S3Source:
    def __init__(self, uri: str, cfg: IngestConfig, client: Any | None) -> None:
        self.cfg, self.uri = cfg, uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client if client is not None else make_s3_client(cfg)

    def entries(self) -> list[_Entry]:
        from botocore.exceptions import BotoCoreError, ClientError

        limits, names, out = _Limits(self.cfg, self.uri), _UniqueNames(self.uri), []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self.prefix,
            PaginationConfig={"PageSize": self.cfg.s3_page_size},
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if not key or key.endswith("/"):
                        continue  # "folder" marker objects
                    rel = _safe_member_name(key, self.uri)
                    limits.add(rel, obj["Size"])
                    names.add(rel)
                    if not is_hidden(rel):
                        out.append(_Entry(rel, obj["Size"], obj.get("ETag"), origin=key))
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(self.uri, "listing", exc) from None
        if not out:
            raise DataError(f"{self.uri}: no objects under this prefix")
        return out

    def _get(self, entry: _Entry) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        key = self.prefix + entry.where
        uri = f"s3://{self.bucket}/{key}"
        # botocore retries failed requests; a body cut off mid-stream is retried here.
        for attempt in range(1, self.cfg.s3_max_attempts + 1):
            try:
                kwargs = {"IfMatch": entry.ref} if entry.ref else {}
                response = self.client.get_object(Bucket=self.bucket, Key=key, **kwargs)
                data = response["Body"].read()
                break
            except (
                ResponseStreamingError,
                IncompleteReadError,
                ReadTimeoutError,
                ConnectionClosedError,
            ) as exc:
                if attempt == self.cfg.s3_max_attempts:
                    raise _s3_error(uri, f"download (after {attempt} attempts)", exc) from None
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412"):
                    raise DataError(f"{uri}: changed while being ingested; run again") from None
                raise _s3_error(uri, "download", exc) from None
            except BotoCoreError as exc:
                raise _s3_error(uri, "download", exc) from None
        if len(data) != entry.size:
            raise DataError(f"{uri}: got {len(data):,} bytes, the listing said {entry.size:,}")
        etag = (entry.ref or "").strip('"')
        encryption = response.get("ServerSideEncryption", "")
        plain_md5 = (
            re.fullmatch(r"[0-9a-f]{32}", etag)
            and not encryption.startswith("aws:kms")
            and "SSECustomerAlgorithm" not in response
        )  # else the ETag is no MD5
        if plain_md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != etag:
            raise DataError(f"{uri}: content does not match its ETag (corrupted download)")
        return data

    def read(self, entries: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        window = 4 * self.cfg.s3_workers
        with ThreadPoolExecutor(self.cfg.s3_workers, thread_name_prefix="s3-get") as pool:
            pending: deque[tuple[_Entry, Future[bytes]]] = deque()
            todo = iter(entries)
            try:
                for entry in todo:
                    pending.append((entry, pool.submit(self._get, entry)))
                    if len(pending) >= window:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
            finally:
                for _, future in pending:
                    future.cancel()

    def close(self) -> None:
        pass


# ------------------------------------------------------ CIFAR-10 python archive --------


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    import _codecs

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # how protocol-2 pickles spell bytes
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the numpy array constructors; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        target = _allowed_globals().get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return target


def restricted_loads(data: bytes, name: str) -> Any:
    """Unpickle ``data`` allowing numpy arrays and plain containers only.

    Python-2 pickles (the CIFAR-10 release) load with ``encoding="bytes"``.
    """
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure of untrusted input is the input's fault
        raise DataError(f"{name}: refused or unreadable pickle ({exc})") from None


_CIFAR_META = "batches.meta"
_CIFAR_BATCH = re.compile(r"^(data_batch_\d+|test_batch)$")


def _is_cifar_python(entries: list[_Entry]) -> bool:
    names = {e.rel.rsplit("/", 1)[-1] for e in entries}
    return _CIFAR_META in names and any(_CIFAR_BATCH.match(n) for n in names)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    for candidate in (key.encode(), key):
        if candidate in obj:
            return obj[candidate]
    raise DataError(f"{where}: no {key!r} field")


class _CifarPythonSource:
    """The original CIFAR-10 release (``cifar-10-batches-py``) as ``train/<class>/*.ppm``
    and ``test/<class>/*.ppm`` images. PPM bytes are the exact pixels, losslessly and
    deterministically, so re-ingesting the archive finds every image already stored."""

    def __init__(self, inner: _Source, listed: list[_Entry]) -> None:
        self.inner, self.listed, self.uri = inner, listed, inner.uri
        self._pixels: dict[str, np.ndarray] = {}

    def entries(self) -> list[_Entry]:
        raw = [
            e
            for e in self.listed
            if PurePosixPath(e.rel).name == _CIFAR_META
            or _CIFAR_BATCH.match(PurePosixPath(e.rel).name)
        ]
        loaded = {
            e.rel: restricted_loads(data, f"{self.uri}/{e.rel}") for e, data in self.inner.read(raw)
        }
        meta_rel = next(rel for rel in loaded if rel.endswith(_CIFAR_META))
        label_names = [
            _text(n) for n in _field(loaded[meta_rel], "label_names", f"{self.uri}/{meta_rel}")
        ]
        out = []
        for rel in sorted(loaded):
            if rel == meta_rel:
                continue
            where = f"{self.uri}/{rel}"
            data = _field(loaded[rel], "data", where)
            labels = list(_field(loaded[rel], "labels", where))
            filenames = [_text(n) for n in _field(loaded[rel], "filenames", where)]
            if not (
                isinstance(data, np.ndarray)
                and data.dtype == np.uint8
                and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32
            ):
                raise DataError(f"{where}: 'data' must be a uint8 array of shape (N, 3072)")
            if not len(labels) == len(filenames) == len(data):
                raise DataError(f"{where}: 'data', 'labels' and 'filenames' differ in length")
            partition = "test" if PurePosixPath(rel).name == "test_batch" else "train"
            for row, label, filename in zip(data, labels, filenames, strict=True):
                if not (isinstance(label, int | np.integer) and 0 <= label < len(label_names)):
                    raise DataError(
                        f"{where}: label {label!r} of {filename!r} is not one of "
                        f"the {len(label_names)} classes"
                    )
                stem = PurePosixPath(filename).stem or "image"
                image_rel = f"{partition}/{label_names[label]}/{stem}.ppm"
                n = 1
                while image_rel in self._pixels:  # a file name repeated across batches
                    n += 1
                    image_rel = f"{partition}/{label_names[label]}/{stem}-{n}.ppm"
                self._pixels[image_rel] = row
                origin = f"{rel}/{PurePosixPath(filename).name}"
                out.append(_Entry(image_rel, len(_PPM_HEADER) + row.size, origin=origin))
        return out

    def read(self, entries: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        for entry in entries:
            # (3072,) = R, G, B planes of 32x32 -> interleaved (32, 32, 3)
            pixels = self._pixels[entry.rel].reshape(3, 32, 32).transpose(1, 2, 0)
            yield entry, _PPM_HEADER + pixels.tobytes()

    def close(self) -> None:
        self.inner.close()


_PPM_HEADER = b"P6\n32 32\n255\n"


def _open_source(source: str, cfg: IngestConfig, s3_client: Any | None) -> _Source:
    if source.startswith("s3://"):
        src: _Source = _S3Source(source, cfg, s3_client)
    else:
        path = Path(source).expanduser().absolute()
        if path.is_dir():
            src = _FolderSource(path, cfg)
        elif is_archive(path):
            src = (_ZipSource if path.name.lower().endswith(".zip") else _TarSource)(path, cfg)
        elif path.exists():
            raise DataError(
                f"{path}: not a folder, a supported archive (.tar, .tar.gz, .tgz, "
                ".zip) or an s3:// prefix"
            )
        else:
            raise DataError(f"{path}: no such file or folder")
    return src


# ----------------------------------------------------------------------------------------
# Decoding: once, at ingestion, on worker processes for large sources
# ----------------------------------------------------------------------------------------


def probe_image(data: bytes) -> ImageProbe:
    """Fully decode ``data``; its size, band count and canonical suffix, or the error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the full decode: truncated or corrupt data fails here
            fmt = img.format or ""
            width, height = img.size
            channels = len(img.getbands())
    except UnidentifiedImageError:
        return ImageProbe(error="not an image file (cannot identify its format)")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return ImageProbe(error=f"unreadable or truncated image ({exc})")
    return ImageProbe(width, height, channels, _FORMAT_SUFFIX.get(fmt, f".{fmt.lower()}"))


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


def _probe_and_store(batch: list[tuple[str, bytes]], root: str | None) -> list[ImageProbe]:
    """Decode each image; write the decodable ones under ``root`` (worker-process safe)."""
    probes = []
    for sha, data in batch:
        probe = probe_image(data)
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

    def __init__(self, root: Path | None, workers: int, expected: int) -> None:
        self.root = str(root) if root is not None else None
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
        self.pending: deque[tuple[list[Any], Future[list[ImageProbe]] | list[ImageProbe]]] = deque()

    def submit(
        self, keys: list[Any], batch: list[tuple[str, bytes]]
    ) -> Iterator[tuple[Any, ImageProbe]]:
        """Queue one batch; yield results of batches that are done, oldest first."""
        if self.pool is None:
            self.pending.append((keys, _probe_and_store(batch, self.root)))
        else:
            self.pending.append((keys, self.pool.submit(_probe_and_store, batch, self.root)))
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
    items: Iterable[tuple[Any, bytes]], workers: int = 2, expected: int = 0
) -> Iterator[tuple[Any, ImageProbe]]:
    """Decode ``(key, bytes)`` items without storing them; yields ``(key, probe)`` in input
    order. ``expected`` (the item count, if known) decides whether worker processes pay."""
    decoder = _Decoder(None, workers, expected)
    try:
        keys: list[Any] = []
        batch: list[tuple[str, bytes]] = []
        for name, data in items:
            keys.append(name)
            batch.append(("", data))
            if len(batch) == _CHUNK:
                yield from decoder.submit(keys, batch)
                keys, batch = [], []
        if batch:
            yield from decoder.submit(keys, batch)
        yield from decoder.drain()
    finally:
        decoder.close()


# ----------------------------------------------------------------------------------------
# Ingestion
# ----------------------------------------------------------------------------------------


@dataclass
class _Found:
    """A new image's copies in the source, until its split is decided."""

    copies: list[tuple[LayoutRecord, str]]  # (layout record, path inside the source)
    probe: ImageProbe | None = None


def _pick(copies: list[tuple[LayoutRecord, str]]) -> tuple[LayoutRecord, str]:
    """Which copy of a duplicated image counts: anomalous before normal, then test before
    train, then by path -- so a doubtful image never lands in train or val."""
    return min(copies, key=lambda c: (c[0].is_normal, c[0].partition != "test", c[0].path))


def _layout(
    entries: list[_Entry], data_cfg: DataConfig, uri: str, increment: bool
) -> list[tuple[_Entry, LayoutRecord]]:
    """Label each entry as ``components.data.parse_layout`` does.

    parse_layout checks a whole dataset: the anomalous class, a normal training class (or
    ``train/good/``) must be present. An increment to an existing dataset, such as a folder
    of new normal images only, is exempt: placeholder paths satisfy those checks and are
    dropped again, so labels still come from the one mapping in components.data.
    """
    try:
        stripped = strip_to_layout_root(dict.fromkeys((e.rel for e in entries), b""), Path(uri))
    except DataError as exc:  # data.py names the source as a Path; keep s3:// intact
        raise DataError(uri + str(exc).removeprefix(str(Path(uri)))) from None
    by_path = dict(zip(stripped, entries, strict=True))
    placeholders = set()
    if increment:
        labels = [data_cfg.anomalous_class, "\0normal"] if data_cfg.layout == "classes" else []
        placeholders = {f"train/{label}/\0placeholder.png" for label in [*labels, NORMAL_LABEL]}
    paths = [*stripped, *sorted(placeholders)]
    records = parse_layout(paths, data_cfg.layout, data_cfg.anomalous_class, uri)
    records = [rec for rec in records if rec.path not in placeholders]
    if not records:
        raise DataError(f"{uri}: no images under train/ or test/")
    return [(by_path[rec.path], rec) for rec in records]


def _read_record(dataset: Path) -> dict[str, Any]:
    try:
        return json.loads((dataset / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}


def manifest_decoded(dataset: Path) -> bool:
    """True when ingestion fully decoded every image of the current manifest.csv."""
    record = _read_record(dataset)
    try:
        digest = sha256_hex((dataset / MANIFEST_NAME).read_bytes())
    except OSError:
        return False
    return bool(record.get("all_decoded")) and record.get("manifest_sha256") == digest


def _counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["split"].value_counts()
    return {split: int(counts.get(split, 0)) for split in SPLITS}


def ingest(
    source: str,
    cfg: IngestConfig,
    data_cfg: DataConfig,
    *,
    target: Path | None = None,
    s3_client: Any | None = None,
    progress: Progress | None = None,
    source_name: str | None = None,
) -> IngestReport:
    """Add the images of ``source`` that the dataset lacks; return what was done.

    ``target`` defaults to ``cfg.data_root / cfg.name``. ``source_name`` is how the
    manifest's ``source`` column names the source (default: its path or URI as opened);
    naming it as configured, e.g. relative to the project, keeps the dataset, and so its
    DVC hash, the same wherever the project lies. An unsafe or malformed source is
    refused before anything is written. Existing images keep their path and split; new
    normal training images get a seeded, content-determined train/val split; the rest go
    to test. The new version replaces the old one atomically, or not at all.
    """
    started = time.perf_counter()
    if data_cfg.layout == "manifest":
        raise DataError(
            "data.layout=manifest describes an ingested dataset; ingestion reads "
            "a 'classes' or 'industrial' source"
        )
    target = Path(target if target is not None else Path(cfg.data_root) / cfg.name)
    target = target.expanduser().absolute()
    src = _open_source(source, cfg, s3_client)
    with contextlib.closing(src):
        entries = src.entries()
        if _is_cifar_python(entries):
            src = _CifarPythonSource(src, entries)
            entries = src.entries()
        increment = (target / MANIFEST_NAME).is_file()
        located = _layout(entries, data_cfg, src.uri, increment)
        log.info("ingesting %d images from %s into %s", len(located), src.uri, target)
        # Everything above only read; from here on we write, beside the target.
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.parent):
            _recover(target)
            return _ingest_locked(
                src, located, target, cfg, data_cfg, progress, started, source_name or src.uri
            )


def _ingest_locked(
    src: _Source,
    located: list[tuple[_Entry, LayoutRecord]],
    target: Path,
    cfg: IngestConfig,
    data_cfg: DataConfig,
    progress: Progress | None,
    started: float,
    source_name: str,
) -> IngestReport:
    if (target / MANIFEST_NAME).is_file():
        existing = read_manifest(target)
    elif target.exists() and any(target.iterdir()):
        raise DataError(
            f"{target}: exists but holds no {MANIFEST_NAME}; refusing to write "
            "into it (choose another ingest.name)"
        )
    else:
        existing = pd.DataFrame(columns=MANIFEST_COLUMNS)
    protocol = _protocol(data_cfg)
    recorded = _read_record(target).get("protocol") if len(existing) else None
    if recorded and recorded != protocol:
        changed_keys = ", ".join(
            f"data.{key}={recorded.get(key)!r} (now {value!r})"
            for key, value in protocol.items()
            if recorded.get(key) != value
        )
        raise DataError(
            f"{target}: was ingested with {changed_keys}; a dataset keeps one split "
            "protocol, so ingest into another ingest.name or restore those values"
        )
    known = dict(
        zip(
            existing["sha256"],
            zip(existing["label"], existing["is_normal"], existing["path"], strict=True),
            strict=True,
        )
    )
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        found, duplicates, conflicts = _stream(src, located, known, staging, cfg, progress)
        skipped = tuple(
            f"{src.uri}/{f.copies[0][1]}: {f.probe.error}"
            for f in found.values()
            if f.probe and f.probe.error
        )
        rows = []
        for sha, item in found.items():
            probe = item.probe
            if probe is None or probe.error is not None:
                continue
            rec, rel = _pick(item.copies)
            split = (
                "test"
                if not rec.is_normal or rec.partition == "test"
                else assign_split(sha, data_cfg.seed, data_cfg.val_fraction)
            )
            rows.append(
                {
                    "path": image_path(sha, probe.suffix),
                    "sha256": sha,
                    "label": rec.label,
                    "is_normal": rec.is_normal,
                    "split": split,
                    "width": probe.width,
                    "height": probe.height,
                    "channels": probe.channels,
                    "source": f"{source_name}/{rel}",
                }
            )
        new = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        if new.empty:
            shutil.rmtree(staging)
            frame, changed = existing, False
        else:
            previously_decoded = existing.empty or manifest_decoded(target)
            if not existing.empty:
                _link_tree(target, staging, existing)
            frame = pd.concat([existing, new], ignore_index=True) if len(existing) else new
            frame = frame.sort_values("path", ignore_index=True)
            _write_manifest(staging, frame, previously_decoded, protocol)
            _swap(staging, target)
            changed = True
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return IngestReport(
        dataset=target,
        source=src.uri,
        added=_counts(new),
        totals=_counts(frame),
        seen=len(located),
        duplicates=duplicates,
        conflicts=tuple(conflicts[:20]),
        skipped=skipped,
        changed=changed,
        seconds=time.perf_counter() - started,
    )


def _stream(
    src: _Source,
    located: list[tuple[_Entry, LayoutRecord]],
    known: dict[str, tuple[str, bool, str]],
    staging: Path,
    cfg: IngestConfig,
    progress: Progress | None,
) -> tuple[dict[str, _Found], int, list[str]]:
    """Read every source image once: hash it, and decode + store the ones not yet known."""
    found: dict[str, _Found] = {}
    duplicates, conflicts = 0, []
    keys: list[str] = []
    batch: list[tuple[str, bytes]] = []
    decoder = _Decoder(staging, cfg.workers, len(located))

    def settle(results: Iterator[tuple[str, ImageProbe]]) -> None:
        done = 0
        for sha, probe in results:
            found[sha].probe = probe
            done += 1
            if probe.error is not None and cfg.on_bad_image == "fail":
                raise DataError(
                    f"{src.uri}/{found[sha].copies[0][1]}: {probe.error} "
                    "(set ingest.on_bad_image=skip to leave such images out)"
                )
        if progress and done:
            progress(done)

    try:
        entries = [entry for entry, _ in located]
        for (entry, rec), (read_entry, data) in zip(located, src.read(entries), strict=True):
            assert read_entry is entry
            sha = sha256_hex(data)
            if sha in known:
                duplicates += 1
                label, is_normal, path = known[sha]
                if (label, bool(is_normal)) != (rec.label, rec.is_normal):
                    conflicts.append(
                        f"{src.uri}/{entry.where} is already stored as {path} with label {label!r}"
                    )
                continue
            if sha in found:
                duplicates += 1
                found[sha].copies.append((rec, entry.where))
                continue
            found[sha] = _Found([(rec, entry.where)])
            keys.append(sha)
            batch.append((sha, data))
            if len(batch) == _CHUNK:
                settle(decoder.submit(keys, batch))
                keys, batch = [], []
        if batch:
            settle(decoder.submit(keys, batch))
        settle(decoder.drain())
    finally:
        decoder.close()
    for item in found.values():
        labels = {(rec.label, rec.is_normal) for rec, _ in item.copies}
        if len(labels) > 1:
            kept = _pick(item.copies)
            conflicts.append(
                f"{src.uri}/{kept[1]} has identical copies labelled "
                f"{sorted(label for label, _ in labels)}; kept {kept[0].label!r}"
            )
    return found, duplicates, conflicts


# ----------------------------------------------------------------------------------------
# Writing a version atomically
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (no lock file is left behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"{directory}: another ingestion is writing here; run again when it has finished"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _recover(target: Path) -> None:
    """Undo what an interrupted run left: restore a version moved aside, drop temp folders."""
    backups = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and not target.exists():
        log.warning("restoring %s from an interrupted ingestion", target)
        os.rename(backups.pop(), target)
    for stale in [*backups, *target.parent.glob(f".{target.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _link_tree(source: Path, dest: Path, existing: pd.DataFrame) -> None:
    """Hard-link every file of the current version into the new one (copy if linking fails);
    the files we rewrite are skipped."""
    for dirpath, dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (dest / rel).mkdir(exist_ok=True)
        for name in filenames:
            if rel == Path(".") and name in (MANIFEST_NAME, RECORD_NAME):
                continue
            src_file, dst_file = Path(dirpath) / name, dest / rel / name
            try:
                os.link(src_file, dst_file)
            except FileExistsError:
                pass  # a new image that an old one already covers: same bytes
            except OSError:
                shutil.copy2(src_file, dst_file)
        dirnames.sort()
    missing = [p for p in existing["path"] if not (dest / p).is_file()]
    if missing:
        raise DataError(
            f"{source / missing[0]}: listed in {MANIFEST_NAME} but missing "
            f"({len(missing)} such files); restore the dataset (`dvc checkout`) "
            "before ingesting more"
        )


def _protocol(data_cfg: DataConfig) -> dict[str, Any]:
    """The DataConfig values that decide labels and splits; fixed for a dataset's life."""
    keys = ("layout", "anomalous_class", "seed", "val_fraction")
    return {key: getattr(data_cfg, key) for key in keys}


def _write_manifest(
    dataset: Path, frame: pd.DataFrame, all_decoded: bool, protocol: dict[str, Any]
) -> None:
    manifest = dataset / MANIFEST_NAME
    with open(manifest, "w", newline="") as fh:
        frame[MANIFEST_COLUMNS].to_csv(fh, index=False)
        fh.flush()
        os.fsync(fh.fileno())
    record = {
        "format": 1,
        "images": len(frame),
        "all_decoded": all_decoded,
        "manifest_sha256": sha256_hex(manifest.read_bytes()),
        "protocol": protocol,
    }
    (dataset / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` in place of ``target`` with two renames; on failure, undo."""
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    had_target = target.exists()
    if had_target:
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        if had_target:
            os.rename(backup, target)
        raise
    if had_target:
        shutil.rmtree(backup, ignore_errors=True)


__all__ = [
    "ImageProbe",
    "IngestReport",
    "image_path",
    "ingest",
    "make_s3_client",
    "manifest_decoded",
    "parse_s3_uri",
    "probe_image",
    "probe_images",
    "restricted_loads",
]
