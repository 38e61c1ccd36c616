"""Local sources: a folder, a ``.tar``/``.tar.gz`` or a ``.zip`` archive (every member is
checked before anything is written; archives are read in memory, never extracted)."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from components.config import IngestConfig
from components.data.layout import (
    check_no_empty_class_folders,
    is_hidden,
)
from components.data.sources.base import _Entry, _Limits, _safe_member_name, _UniqueNames
from components.errors import DataError


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


def _admit(
    out: list[_Entry], names: _UniqueNames, limits: _Limits, entry: _Entry, is_dir: bool
) -> None:
    """Count an archive member against the limits; list it unless it is a folder or hidden
    (a name seen twice is refused by ``names``)."""
    limits.add(entry.rel, entry.size)
    if is_dir:
        return
    names.add(entry.rel)
    if not is_hidden(entry.rel):
        out.append(entry)


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
            _admit(out, names, limits, _Entry(rel, member.size, member), member.isdir())

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
            _admit(out, names, limits, _Entry(rel, info.file_size, info), info.is_dir())
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
