"""Image datasets: read a source once, split it without leaks, decode it once.

Sources are a folder, an archive (``.tar``, ``.tar.gz``, ``.zip``; read in memory, never
extracted) or a dataset written by ``nestad ingest`` (a folder with ``manifest.csv``).
Layouts:

- ``classes``: ``train/<class>/*`` and ``test/<class>/*``; one class is anomalous
  (the paper's CIFAR-10 leave-one-class-out protocol: the anomalous class's train *and*
  test images go to test).
- ``industrial``: ``train/good/*``, ``test/good/*``, ``test/<defect>/*``.
- ``manifest``: splits are taken from ``manifest.csv`` as ingestion wrote them.

The validation split is carved out of the normal training images by a seeded hash of each
image's sha256, so the same image always lands in the same split, whatever else is in
the dataset and however often it is re-ingested. The test split chooses nothing.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.config import DataConfig
from components.errors import DataError

if TYPE_CHECKING:  # torch is imported where tensors are made: ingestion and validation
    import torch  # read and hash images without it (seconds less per stage process)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = [
    "path",  # relative to the dataset folder, POSIX separators
    "sha256",
    "label",  # class or defect name; "good" for industrial normals
    "is_normal",
    "split",  # train | val | test
    "width",
    "height",
    "channels",
    "source",
]
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
NORMAL_LABEL = "good"

Progress = Callable[[int], None]


# ----------------------------------------------------------------------------------------
# Reading raw files from a folder or an archive
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Splits: which image is train, val or test
# ----------------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


# ----------------------------------------------------------------------------------------
# Decoding: once per run, into one uint8 array
# ----------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str, image_size: int, channels: int,
                 min_size: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, check and resize one image to ``(image_size, image_size, channels)`` uint8.

    Also returns the original ``(width, height)``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces the full decode, so truncated files fail here
            original = img.size
            if min(img.size) < min_size:
                raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]}, smaller than "
                                f"the allowed minimum {min_size}x{min_size}")
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image file (cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: unreadable or truncated image ({exc})") from None
    return (array[..., None] if channels == 1 else array), original


def decode_images(items: list[tuple[str, bytes]], image_size: int, channels: int,
                  min_size: int = 1, workers: int = 2,
                  progress: Progress | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Decode many images in parallel: ``(N, C, H, W)`` uint8 and original ``(N, 2)`` sizes."""
    import torch

    out = np.empty((len(items), image_size, image_size, channels), dtype=np.uint8)
    sizes = np.zeros((len(items), 2), dtype=np.int64)

    def work(i: int) -> None:
        name, data = items[i]
        out[i], sizes[i] = decode_image(data, name, image_size, channels, min_size)

    chunk = 512
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), chunk):
            idx = range(start, min(start + chunk, len(items)))
            list(pool.map(work, idx))
            if progress:
                progress(len(idx))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), sizes  # (N, C, H, W)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in [0, 255] -> float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Decoded images of one split and what is known about them."""

    images: torch.Tensor  # (N, C, H, W) uint8
    is_anomaly: np.ndarray  # (N,) int, 1 = anomalous
    paths: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class DatasetSplits:
    """train and val hold normal images only; test is sealed: it chooses nothing."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, the rows actually used


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
    rows = []
    seen: dict[str, str] = {}
    for rec in records:
        sha = sha256_hex(files[rec.path])
        if sha in seen:  # an exact duplicate could sit in two splits: keep the first only
            continue
        seen[sha] = rec.path
        if not rec.is_normal or rec.partition == "test":
            split = "test"
        else:
            split = assign_split(sha, cfg.seed, cfg.val_fraction)
        rows.append((rec.path, sha, rec.label, rec.is_normal, split, 0, 0, cfg.channels, source))
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def read_manifest(dataset_dir: Path) -> pd.DataFrame:
    """Read and check an ingested dataset's manifest."""
    path = dataset_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest (run `nestad ingest` first)")
    try:
        frame = pd.read_csv(path, dtype={"path": str, "sha256": str, "label": str,
                                         "split": str, "source": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({exc})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing columns {', '.join(missing)}")
    bad = frame.loc[~frame["split"].isin(SPLITS), "path"]
    if len(bad):
        raise DataError(f"{path}: row {bad.iloc[0]!r} has a split other than {SPLITS}")
    frame["is_normal"] = frame["is_normal"].astype(str).str.lower().isin(["true", "1"])
    leaked = frame.loc[(frame["split"] != "test") & ~frame["is_normal"], "path"]
    if len(leaked):
        raise DataError(f"{path}: anomalous image {leaked.iloc[0]!r} in a train/val split")
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


def load_splits(cfg: DataConfig, progress: Progress | None = None,
                include: tuple[str, ...] = SPLITS) -> DatasetSplits:
    """Read, split, subset and decode a source into train/val/test image sets.

    Splits not in ``include`` are left empty (not decoded); the split itself is the same.
    """
    import torch

    frame, files = scan_source(cfg)
    source = Path(cfg.source).expanduser()
    train_pool = frame[frame["split"] != "test"]
    train_pool = stratified_subset(train_pool, cfg.max_train_images, cfg.seed)
    test = stratified_subset(frame[frame["split"] == "test"], cfg.max_test_images, cfg.seed)
    used = pd.concat([train_pool, test])

    def as_set(name: str) -> ImageSet:
        rows = splits[name] if name in include else splits[name].iloc[:0]
        items = []
        for rel in rows["path"]:
            data = files.get(rel)
            if data is None:
                file = source / rel
                try:
                    data = file.read_bytes()
                except OSError as exc:
                    raise DataError(f"{file}: cannot read ({exc.strerror})") from None
            items.append((f"{source}/{rel}", data))
        if rows.empty:
            shape = (0, cfg.channels, cfg.image_size, cfg.image_size)
            return ImageSet(torch.zeros(shape, dtype=torch.uint8), np.zeros(0, int), [], [])
        images, sizes = decode_images(items, cfg.image_size, cfg.channels,
                                      cfg.min_image_size, cfg.decode_workers, progress)
        if (rows["width"] == 0).any():  # raw sources: sizes known only after decoding
            used.loc[rows.index, "width"] = sizes[:, 0]
            used.loc[rows.index, "height"] = sizes[:, 1]
        return ImageSet(images, (~rows["is_normal"].to_numpy()).astype(int),
                        list(rows["path"]), list(rows["label"]))

    splits = {name: used[used["split"] == name] for name in SPLITS}
    for name in ("train", "val"):
        if splits[name].empty:
            raise DataError(f"{source}: the {name} split is empty (too few normal images for "
                            f"data.val_fraction={cfg.val_fraction})")
    if splits["test"].empty:
        raise DataError(f"{source}: the test split is empty")
    sets = {name: as_set(name) for name in SPLITS}
    return DatasetSplits(sets["train"], sets["val"], sets["test"], used.reset_index(drop=True))


def load_images(paths: list[Path], image_size: int, channels: int,
                workers: int = 2) -> tuple[torch.Tensor, list[str]]:
    """Decode files, or every image file under folders, for scoring."""
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
    items = []
    for file in files:
        try:
            items.append((str(file), file.read_bytes()))
        except OSError as exc:
            raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    images, _ = decode_images(items, image_size, channels, workers=workers)
    return images, [n for n, _ in items]
