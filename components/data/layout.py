"""Source layouts: which files a folder or archive holds, and which image is train, val
or test (``classes``: one class anomalous, the paper's leave-one-class-out protocol;
``industrial``: ``train/good``, ``test/good``, ``test/<defect>``).

The validation split is carved out of the normal training images by a seeded hash of each
image's sha256, so the same image always lands in the same split, whatever else is in
the dataset and however often it is re-ingested. The test split chooses nothing.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from components.data.manifest import NORMAL_LABEL
from components.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(rel).parts)


def iter_source_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative POSIX path, bytes)`` for every regular, non-hidden file."""
    if source.is_dir():
        for file in sorted(source.rglob("*")):
            rel = file.relative_to(source).as_posix()
            if file.is_file() and not is_hidden(rel):
                yield rel, file.read_bytes()
    elif is_archive(source) and source.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(source) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if not info.is_dir() and not is_hidden(info.filename):
                        yield info.filename, zf.read(info)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{source}: not a readable zip archive ({exc})") from None
    elif is_archive(source):
        try:
            with tarfile.open(source, "r:*") as tf:
                for member in tf:
                    if member.isfile() and not is_hidden(member.name):
                        handle = tf.extractfile(member)
                        assert handle is not None  # regular files always have a handle
                        yield member.name.removeprefix("./"), handle.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{source}: not a readable tar archive ({exc})") from None
    elif source.exists():
        raise DataError(
            f"{source}: not a folder or a supported archive ({', '.join(ARCHIVE_SUFFIXES)})"
        )
    else:
        raise DataError(f"{source}: no such file or folder")


def strip_to_layout_root(files: dict[str, bytes], source: Path) -> dict[str, bytes]:
    """Drop a leading folder (``cifar10/train/...`` -> ``train/...``) above train/ and test/."""
    prefixes = set()
    for rel in files:
        parts = PurePosixPath(rel).parts
        if "train" in parts:
            prefixes.add(parts[: parts.index("train")])
        elif "test" in parts:
            prefixes.add(parts[: parts.index("test")])
    if not prefixes:
        raise DataError(f"{source}: no train/ or test/ folder found")
    if len(prefixes) > 1:
        listed = ", ".join(sorted("/".join(p) or "." for p in prefixes))
        raise DataError(f"{source}: train/ and test/ found under several folders: {listed}")
    depth = len(prefixes.pop())
    return {"/".join(PurePosixPath(rel).parts[depth:]): data for rel, data in files.items()}


def assign_split(sha256: str, seed: int, val_fraction: float) -> str:
    """``"val"`` for a seeded, content-determined fraction of normal training images.

    Depends only on the image's own hash, so adding images never moves existing ones.
    """
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


@dataclass(frozen=True)
class LayoutRecord:
    """One image as the source layout describes it."""

    path: str
    label: str
    is_normal: bool
    partition: str  # "train" or "test" in the source layout


def parse_layout(
    rel_paths: list[str], layout: str, anomalous_class: str | None, source: str
) -> list[LayoutRecord]:
    """Map ``train/<label>/...`` and ``test/<label>/...`` paths to records.

    Non-image files are refused with an error naming the file. The anomalous class must
    exist and every class folder must hold at least one image.
    """
    per_label: dict[tuple[str, str], int] = {}
    records = []
    for rel in rel_paths:
        parts = PurePosixPath(rel).parts
        if len(parts) < 3 or parts[0] not in ("train", "test"):
            if parts and parts[0] in ("train", "test"):
                raise DataError(f"{source}/{rel}: images must sit in {parts[0]}/<label>/ folders")
            continue  # e.g. ground_truth/ masks or a README beside train/ and test/
        if PurePosixPath(rel).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{source}/{rel}: not an image file (expected one of "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        partition, label = parts[0], parts[1]
        per_label[(partition, label)] = per_label.get((partition, label), 0) + 1
        if layout == "industrial":
            if partition == "train" and label != NORMAL_LABEL:
                raise DataError(
                    f"{source}/{rel}: the industrial layout allows only train/{NORMAL_LABEL}/"
                )
            is_normal = label == NORMAL_LABEL
        else:
            is_normal = label != anomalous_class
        records.append(LayoutRecord(rel, label, is_normal, partition))
    labels = {label for _, label in per_label}
    if layout == "classes":
        if anomalous_class not in labels:
            known = ", ".join(sorted(labels)) or "none"
            raise DataError(f"{source}: unknown anomalous class {anomalous_class!r} "
                            f"(classes found: {known})")
        train_labels = {label for part, label in per_label if part == "train"}
        if not train_labels - {anomalous_class}:
            raise DataError(f"{source}: no normal class in train/")
    if layout == "industrial" and ("train", NORMAL_LABEL) not in per_label:
        raise DataError(f"{source}: train/{NORMAL_LABEL}/ holds no images")
    return records


def check_no_empty_class_folders(source: Path) -> None:
    if not source.is_dir():
        return
    for part in ("train", "test"):
        for root in source.rglob(part):
            if not root.is_dir():
                continue
            for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                if not any(f.is_file() and not f.name.startswith(".")
                           for f in label_dir.rglob("*")):
                    raise DataError(f"{label_dir}: empty class folder")
