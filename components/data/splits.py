"""Loading a dataset for training: read a source once, split it without leaks, decode it
once into ``ImageSet``s (a folder, an archive, or a dataset with ``manifest.csv``).

Pixel masks (industrial layout, ``ground_truth/<defect>/<stem>_mask.<ext>``) come with the
test split: ``ImageSet.masks``, read from ``ground_truth/`` of a folder or archive
source, or from the ``mask`` column of an ingested dataset's manifest (``nestad ingest``
stores them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.config import DataConfig
from components.data.duplicates import ImageCopy, apply_policy, find_duplicates, pick_copy
from components.data.images import (
    ImageRules,
    Progress,
    decode_images,
    decode_mask,
    image_rules,
    sha256_hex,
)
from components.data.layout import (
    IMAGE_SUFFIXES,
    LayoutRecord,
    assign_split,
    check_no_empty_class_folders,
    is_hidden,
    iter_source_files,
    match_masks,
    parse_layout,
    strip_to_layout_root,
)
from components.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME, SPLITS, read_manifest
from components.errors import DataError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where tensors are made: ingestion and validation
    import torch  # read and hash images without it (seconds less per stage process)


@dataclass
class ImageSet:
    """Decoded images of one split and what is known about them."""

    images: torch.Tensor  # (N, C, H, W) uint8
    is_anomaly: np.ndarray  # (N,) int, 1 = anomalous
    paths: list[str]
    labels: list[str]
    # (N, H, W) uint8 in {0, 1} (1 = defect pixel) at the model input size, row i the mask of
    # image i (zeros for normal images); None when the source has no ground truth (no
    # ground_truth/ folder, the classes layout, an ingested dataset) and for train and val.
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class DatasetSplits:
    """train and val hold normal images only; test is sealed: it chooses nothing."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, the rows actually used
    warnings: tuple[str, ...] = ()  # identical copies in the source (data.duplicates)


def stratified_subset(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of at most ``limit`` rows, stratified by ``is_normal``."""
    if limit is None or len(frame) <= limit:
        return frame
    parts = []
    for _, group in frame.groupby("is_normal", sort=True):
        take = max(1, round(limit * len(group) / len(frame)))
        parts.append(group.sample(n=min(take, len(group)), random_state=seed))
    return pd.concat(parts).sort_index()


def _build_manifest(files: dict[str, bytes], cfg: DataConfig, source: str) -> pd.DataFrame:
    records = parse_layout(sorted(files), cfg.layout, cfg.anomalous_class, source)
    groups: dict[str, list[tuple[ImageCopy, LayoutRecord]]] = {}
    for rec in records:
        sha = sha256_hex(files[rec.path])
        if not rec.is_normal or rec.partition == "test":
            split = "test"
        else:
            split = assign_split(sha, cfg.seed, cfg.val_fraction)
        copy = ImageCopy(f"{source}/{rec.path}", rec.label, split, rec.is_normal)
        groups.setdefault(sha, []).append((copy, rec))
    # Identical copies: a leak or mislabel fails (data.duplicates), repeats are named.
    findings = find_duplicates([[c for c, _ in group] for group in groups.values()])
    warnings = apply_policy(findings, cfg.duplicates)
    for line in warnings:
        log.info("%s", line)  # shown by the caller (DatasetSplits.warnings)
    rows = []
    for sha, group in groups.items():
        kept = pick_copy(c for c, _ in group)
        rec = next(r for c, r in group if c == kept)
        rows.append((rec.path, sha, rec.label, rec.is_normal, kept.split, 0, 0, cfg.channels,
                     source, ""))
    rows.sort(key=lambda row: row[0])
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame.attrs["warnings"] = tuple(warnings)
    return frame


def scan_source(cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """The manifest of a source and the bytes of its images (keyed by manifest path)."""
    source = Path(cfg.source).expanduser()
    if cfg.layout == "manifest" or (source / MANIFEST_NAME).is_file():
        frame = read_manifest(source)
        return frame, {}  # images are read lazily from the dataset folder
    check_no_empty_class_folders(source)
    files = strip_to_layout_root(dict(iter_source_files(source)), source)
    return _build_manifest(files, cfg, str(source)), files


def source_masks(cfg: DataConfig, files: dict[str, bytes], source: Path,
                 frame: pd.DataFrame | None = None) -> dict[str, str] | None:
    """The mask of each defect test image (paths in the source or the dataset folder), or
    None when the source has none: not the industrial layout, or no ground truth.

    An ingested dataset's masks are its manifest's ``mask`` column: all its defect test
    images have one, or none has (a dataset ingested partly without masks is an error
    naming the first image that lacks one)."""
    if not files and frame is not None and "mask" in frame:
        defects = frame[(frame["split"] == "test") & ~frame["is_normal"]]
        with_mask = defects["mask"].fillna("").astype(str) != ""
        if not with_mask.any():
            return None
        if not with_mask.all():
            lacking = defects.loc[~with_mask].iloc[0]
            raise DataError(
                f"{source}/{lacking['path']} ({lacking['source']}): defect image has no "
                f"stored mask, but {int(with_mask.sum())} others have; ingest its mask "
                "(ground_truth/<defect>/<stem>_mask.png) or ingest into a new dataset")
        return dict(zip(defects["path"], defects["mask"], strict=True))
    if cfg.layout != "industrial" or not files:
        return None
    paths = sorted(files)
    records = parse_layout(paths, cfg.layout, cfg.anomalous_class, str(source))
    return match_masks(paths, records, str(source))


def _read(source: Path, rel: str, files: dict[str, bytes]) -> bytes:
    """The bytes of ``rel``: from the source already read, else from the dataset folder."""
    data = files.get(rel)
    if data is None:
        file = source / rel
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    return data


def _image_name(source: Path, rel: str, given: object, files: dict[str, bytes]) -> str:
    """How errors name an image: a stored image (an ingested dataset, read from its folder)
    by the file the user ingested, then where it is stored; a source's own by its path."""
    if not files and isinstance(given, str) and given:
        return f"{given} (stored as {source}/{rel})"
    return f"{source}/{rel}"


def load_splits(cfg: DataConfig, progress: Progress | None = None,
                include: tuple[str, ...] = SPLITS) -> DatasetSplits:
    """Read, split, subset and decode a source into train/val/test image sets.

    Splits not in ``include`` are left empty (not decoded); the split itself is the same.
    """
    import torch

    frame, files = scan_source(cfg)
    warnings = frame.attrs.get("warnings", ())
    source = Path(cfg.source).expanduser()
    mask_of = source_masks(cfg, files, source, frame)
    train_pool = frame[frame["split"] != "test"]
    train_pool = stratified_subset(train_pool, cfg.max_train_images, cfg.seed)
    test = stratified_subset(frame[frame["split"] == "test"], cfg.max_test_images, cfg.seed)
    used = pd.concat([train_pool, test])

    def as_set(name: str) -> ImageSet:
        rows = splits[name] if name in include else splits[name].iloc[:0]
        items = []
        for rel, given in zip(rows["path"], rows["source"], strict=True):
            items.append((_image_name(source, rel, given, files), _read(source, rel, files)))
        with_masks = mask_of is not None and name == "test"
        if rows.empty:
            shape = (0, cfg.channels, cfg.image_size, cfg.image_size)
            masks = torch.zeros(shape[:1] + shape[2:], dtype=torch.uint8) if with_masks else None
            return ImageSet(torch.zeros(shape, dtype=torch.uint8), np.zeros(0, int), [], [],
                            masks)
        images, sizes = decode_images(items, cfg.image_size, cfg.channels,
                                      image_rules(cfg), cfg.decode_workers, progress)
        if (rows["width"] == 0).any():  # raw sources: sizes known only after decoding
            used.loc[rows.index, "width"] = sizes[:, 0]
            used.loc[rows.index, "height"] = sizes[:, 1]
        masks = None
        if with_masks:
            assert mask_of is not None
            masks = torch.zeros((len(items), cfg.image_size, cfg.image_size), dtype=torch.uint8)
            for i, rel in enumerate(rows["path"]):
                mask_rel = mask_of.get(rel)  # normal images have none: zeros
                if mask_rel is not None:
                    masks[i] = torch.from_numpy(decode_mask(
                        _read(source, mask_rel, files), f"{source}/{mask_rel}",
                        cfg.image_size, items[i][0], (int(sizes[i, 0]), int(sizes[i, 1]))))
        return ImageSet(images, (~rows["is_normal"].to_numpy()).astype(int),
                        list(rows["path"]), list(rows["label"]), masks)

    splits = {name: used[used["split"] == name] for name in SPLITS}
    for name in ("train", "val"):
        if splits[name].empty:
            raise DataError(f"{source}: the {name} split is empty (too few normal images for "
                            f"data.val_fraction={cfg.val_fraction})")
    if splits["test"].empty:
        raise DataError(f"{source}: the test split is empty")
    sets = {name: as_set(name) for name in SPLITS}
    return DatasetSplits(sets["train"], sets["val"], sets["test"], used.reset_index(drop=True),
                         warnings)


def image_files(paths: list[Path]) -> list[Path]:
    """The files to score: each path in turn, a folder's image files sorted (hidden files and
    other suffixes skipped); an empty folder or a missing path is a DataError."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(f for f in path.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not is_hidden(f.relative_to(path).as_posix()))
            if not found:
                raise DataError(f"{path}: folder holds no image files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def load_images(paths: list[Path], image_size: int, channels: int, workers: int = 2,
                rules: ImageRules | None = None) -> tuple[torch.Tensor, list[str]]:
    """Decode files, or every image file under folders, for scoring, by the rules training
    applied (``rules``; default: the config defaults): what it refuses is not scored."""
    items = []
    for file in image_files(paths):
        try:
            items.append((str(file), file.read_bytes()))
        except OSError as exc:
            raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    images, _ = decode_images(items, image_size, channels, rules, workers=workers)
    return images, [n for n, _ in items]
