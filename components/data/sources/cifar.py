"""The original CIFAR-10 python archive: pickled batches, read with a numpy-only
unpickler, each image re-encoded as a binary PPM."""

from __future__ import annotations

import functools
import io
import pickle
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from components.data.sources.base import _Entry, _Source
from components.errors import DataError


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
