"""Source layouts: which files a folder or archive holds, and which image is train, val
or test (``classes``: one class anomalous, the paper's leave-one-class-out protocol;
``industrial``: ``train/good``, ``test/good``, ``test/<defect>``, and optionally the pixel
masks of the defect images, ``ground_truth/<defect>/<stem>_mask.<ext>`` (MVTec AD)).

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
GROUND_TRUTH = "ground_truth"  # industrial layout: the pixel masks, beside train/ and test/
MASK_SUFFIX = "_mask"  # ground_truth/<defect>/<stem>_mask.<ext> for test/<defect>/<stem>.<ext>


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
        if GROUND_TRUTH in parts[: _first_split_folder(parts)]:
            continue  # masks: ground_truth/<defect>/ may be named like a split folder
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


def _first_split_folder(parts: tuple[str, ...]) -> int:
    """Index of the first ``train`` or ``test`` part (``len(parts)`` if there is none)."""
    return min((parts.index(p) for p in ("train", "test") if p in parts), default=len(parts))


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


def _mask_key(parts: tuple[str, ...]) -> tuple[str, ...]:
    """``(<defect>, <sub folders>..., <stem>)`` of ``test/...`` or ``ground_truth/...`` parts
    (the ``_mask`` suffix already removed from a mask's stem)."""
    return (*parts[1:-1], PurePosixPath(parts[-1]).stem)


def match_masks(
    rel_paths: list[str], records: list[LayoutRecord], source: str
) -> dict[str, str] | None:
    """The mask file of each defect test image of the industrial layout (MVTec AD), or None
    when the source holds no ``ground_truth/`` file at all.

    ``test/<defect>/<sub>/<stem>.<ext>`` has its mask at
    ``ground_truth/<defect>/<sub>/<stem>_mask.<ext2>`` (any image suffix). Masks are never
    images: ``parse_layout`` leaves ``ground_truth/`` out. When ground truth is given, it must
    be complete and exact: a defect image without a mask, a mask without a defect image,
    a mask named otherwise and two masks for one image are each a ``DataError`` naming the
    files. Files without an image suffix (a README) are ignored. Paths only: sizes are
    checked when the masks are decoded.
    """
    masks: dict[tuple[str, ...], str] = {}
    seen_any = False
    for rel in rel_paths:
        parts = PurePosixPath(rel).parts
        if not parts or parts[0] != GROUND_TRUTH:
            continue
        seen_any = True
        if PurePosixPath(rel).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if len(parts) < 3:
            raise DataError(f"{source}/{rel}: masks must sit in {GROUND_TRUTH}/<defect>/ folders")
        stem = PurePosixPath(parts[-1]).stem
        if not stem.endswith(MASK_SUFFIX) or stem == MASK_SUFFIX:
            raise DataError(
                f"{source}/{rel}: not a mask name (expected "
                f"{GROUND_TRUTH}/<defect>/<image stem>{MASK_SUFFIX}.<ext>)"
            )
        key = (*parts[1:-1], stem.removesuffix(MASK_SUFFIX))
        if key in masks:
            raise DataError(
                f"{source}/{rel} and {source}/{masks[key]}: two masks for the same image"
            )
        masks[key] = rel
    if not seen_any:
        return None
    mask_of: dict[str, str] = {}
    missing: list[str] = []
    for rec in records:
        if rec.partition == "test" and not rec.is_normal:
            key = _mask_key(PurePosixPath(rec.path).parts)
            if key in masks:
                mask_of[rec.path] = masks[key]
            else:
                missing.append(rec.path)
    if missing:
        parts = PurePosixPath(missing[0]).parts
        expected = "/".join((GROUND_TRUTH, *_mask_key(parts))) + f"{MASK_SUFFIX}.png"
        more = f"; {len(missing) - 1} more defect images lack masks" if len(missing) > 1 else ""
        raise DataError(
            f"{source}/{missing[0]}: defect image has no mask (expected {source}/{expected}, "
            f"any image suffix, since {GROUND_TRUTH}/ exists){more}"
        )
    used = set(mask_of.values())
    for key, rel in masks.items():
        if rel not in used:
            image = "/".join(("test", *key)) + ".<ext>"
            why = (f"{NORMAL_LABEL} images are normal and take no mask" if key[0] == NORMAL_LABEL
                   else f"no defect image {source}/{image}")
            raise DataError(f"{source}/{rel}: mask without an image ({why})")
    return mask_of
