"""Which reader a source string needs: S3, the CIFAR-10 python archive, a tar or zip
archive, or a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config import IngestConfig
from components.data.layout import (
    is_archive,
)
from components.data.sources.base import _Source
from components.data.sources.files import _FolderSource, _TarSource, _ZipSource
from components.data.sources.s3 import _S3Source
from components.errors import DataError


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
