"""Tiny synthetic image datasets written with Pillow, and tiny params (the helpers behind
the fixtures in conftest.py; imported by name by the support modules and tests).

Every synthetic image comes from ``synthetic_image``: a smooth pattern plus a little noise,
optionally with a planted defect (a bright square). Images are distinct (seeded per file),
so the content-hashed split never drops one as a duplicate.
"""


from __future__ import annotations

import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.config import Params, parse_params
from components.data.splits import ImageSet

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("gradient", "blob", "stripes")  # three visually distinct classes
DEFECT = "square"

# Dotted keys that make every run tiny and deterministic (CPU, fp32, 1 decode thread).
TINY = {
    "data.image_size": 16,
    "data.channels": 3,
    "data.val_fraction": 0.25,
    "data.decode_workers": 1,
    "data.min_image_size": 8,
    "model.base_width": 4,
    "model.disc_width": 8,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.lr_decay_start": 100,
    "train.device": "cpu",
    "train.precision": "fp32",
    "train.channels_last": False,
    "evaluate.batch_size": 64,
    "evaluate.plots": False,
    "evaluate.grid_images": 4,
}


def synthetic_image(
    pattern: str, seed: int, size: int = 32, mode: str = "RGB", defect: bool = False
) -> Image.Image:
    """One ``size`` x ``size`` image of ``pattern`` (gradient | blob | stripes), in [0, 0.7]
    plus noise; ``defect`` plants a bright (white) square of side 3/8 of the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)  # (H, W) in [0, 1]
    if pattern == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        base = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    elif pattern == "blob":
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        base = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.18**2))
    elif pattern == "stripes":
        freq, phase = rng.uniform(2.5, 3.5), rng.uniform(0, 2 * np.pi)
        base = 0.5 + 0.5 * np.sin(2 * np.pi * freq * xx + phase)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    tint = rng.uniform(0.7, 1.0, size=3)  # per-channel colour
    img = 0.7 * base[..., None] * tint + rng.normal(0, 0.02, size=(size, size, 3))
    if defect:
        side = max(size * 3 // 8, 2)
        y0, x0 = rng.integers(2, size - side - 2, size=2)
        img[y0 : y0 + side, x0 : x0 + side] = 1.0
    array = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def synthetic_batch(
    count: int, size: int = 16, pattern: str = "blob", defect: bool = False, seed: int = 0
) -> torch.Tensor:
    """``count`` synthetic RGB images as uint8 ``(N, 3, size, size)``, as the data module
    decodes them."""
    arrays = [
        np.array(synthetic_image(pattern, seed + i, size, defect=defect)) for i in range(count)
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def synthetic_image_set(count: int = 16, anomalous: int = 0, seed: int = 0) -> ImageSet:
    """A decoded in-memory split of ``count`` synthetic images, the first ``anomalous``
    flagged anomalous (what ``fit`` and ``evaluate`` take)."""
    flags = np.zeros(count, dtype=int)
    flags[:anomalous] = 1
    return ImageSet(synthetic_batch(count, seed=seed), flags,
                    [f"img{i}.png" for i in range(count)], ["good"] * count)


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def write_images(
    folder: Path,
    pattern: str,
    count: int,
    *,
    start: int = 0,
    size: int = 32,
    mode: str = "RGB",
    defect: bool = False,
    tag: str = "",
) -> list[Path]:
    """Write ``count`` PNGs of one pattern into ``folder``; seeds depend on folder and index."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"{tag}{i:04d}.png"
        seed = _seed(folder.parent.name, folder.name, tag, i)
        synthetic_image(pattern, seed, size, mode, defect).save(path)
        paths.append(path)
    return paths


def write_dataset(
    root: Path,
    layout: str,
    *,
    n_train: int = 12,
    n_test: int = 4,
    n_defect: int = 4,
    size: int = 32,
    mode: str = "RGB",
    pattern: str = "blob",
) -> Path:
    """An image-folder dataset under ``root``.

    ``classes``: train/<class>/ (n_train each) and test/<class>/ (n_test each) for CLASSES.
    ``industrial``: train/good (n_train), test/good (n_test) and test/square (n_defect):
    ``pattern`` images, the defective ones with a planted bright square.
    """
    if layout == "classes":
        for part, count in (("train", n_train), ("test", n_test)):
            for cls in CLASSES:
                write_images(root / part / cls, cls, count, size=size, mode=mode)
    elif layout == "industrial":
        write_images(root / "train" / "good", pattern, n_train, size=size, mode=mode)
        write_images(root / "test" / "good", pattern, n_test, size=size, mode=mode)
        write_images(root / "test" / DEFECT, pattern, n_defect, size=size, mode=mode, defect=True)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return root


def pack_archive(folder: Path, kind: str) -> Path:
    """Pack ``folder`` (keeping its name as the top-level folder) as ``tar.gz`` or ``zip``."""
    out = folder.parent / f"{folder.name}.{kind}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if kind == "zip":
        with zipfile.ZipFile(out, "w") as zf:
            for file in files:
                zf.write(file, file.relative_to(folder.parent).as_posix())
    elif kind in ("tar", "tar.gz"):
        with tarfile.open(out, "w:gz" if kind == "tar.gz" else "w") as tf:
            for file in files:
                tf.add(file, file.relative_to(folder.parent).as_posix())
    else:
        raise ValueError(f"unknown archive kind {kind!r}")
    return out


def tiny_overrides(**overrides: Any) -> dict[str, Any]:
    """TINY plus ``overrides`` (dotted keys, e.g. ``**{"train.epochs": 2}``)."""
    return {**TINY, **overrides}


def build_tiny_params(**overrides: Any) -> Params:
    """A validated ``Params`` with tiny sizes; ``overrides`` are dotted keys or sections
    (``data={"layout": "industrial"}``)."""
    tree: dict[str, dict[str, Any]] = {}
    flat = dict(TINY)
    for key, value in overrides.items():
        if "." in key:
            flat[key] = value
        elif isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            raise TypeError(f"override {key!r}: use a dotted key or a section dict")
    for dotted, value in flat.items():
        section, name = dotted.split(".", 1)
        tree.setdefault(section, {})[name] = value
    return parse_params(tree, origin="tiny_params")
