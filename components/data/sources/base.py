"""What every source gives: a header-only listing of entries (checked against the limits,
nothing written), then the bytes; member names made safe and unique."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from components.config import IngestConfig
from components.errors import DataError


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
