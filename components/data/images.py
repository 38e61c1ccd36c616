"""One image's bytes: probe (format, size, channels), decode and resize into uint8 arrays,
scale to the model's [-1, 1] input; decode a pixel mask with the same geometry."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import DataError

if TYPE_CHECKING:  # torch is imported where tensors are made: ingestion and validation
    import torch  # read and hash images without it (seconds less per stage process)

Progress = Callable[[int], None]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
class ImageProbe:
    """One full decode: the image's own size and band count, or why it failed."""

    width: int = 0
    height: int = 0
    channels: int = 0
    suffix: str = ""
    error: str | None = None


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


def decode_image_original(data: bytes, name: str, channels: int,
                          min_size: int = 1) -> np.ndarray:
    """Decode and check one image at its own size: ``(height, width, channels)`` uint8.

    What ``decode_image`` decodes before it resizes (same checks, same errors, same
    conversion), e.g. to draw a heat map over the source image at its original size.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if min(img.size) < min_size:
                raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]}, smaller than "
                                f"the allowed minimum {min_size}x{min_size}")
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image file (cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: unreadable or truncated image ({exc})") from None
    return array[..., None] if channels == 1 else array


def decode_mask(data: bytes, name: str, image_size: int, image_name: str,
                image_wh: tuple[int, int]) -> np.ndarray:
    """Decode one pixel mask to ``(image_size, image_size)`` uint8 in {0, 1}.

    The mask (any mode, read as 8-bit grey) must have its image's original ``image_wh``
    (width, height); it is binarised at 128 (>= 128 is defect), then resized exactly as
    ``decode_image`` resizes the image -- to a square, aspect not kept, bilinear (Pillow's,
    on the {0, 1} mask as floats) -- and thresholded at 0.5, so a mask pixel is 1 where at
    least half of what the model-input pixel covers is defect.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.size != tuple(image_wh):
                raise DataError(
                    f"{name}: mask is {img.size[0]}x{img.size[1]} but its image {image_name} is "
                    f"{image_wh[0]}x{image_wh[1]}; a mask must have its image's size"
                )
            mask = (np.asarray(img.convert("L"), dtype=np.uint8) >= 128).astype(np.float32)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image file (cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: unreadable or truncated mask ({exc})") from None
    if mask.shape != (image_size, image_size):
        resized = Image.fromarray(mask, "F").resize((image_size, image_size),
                                                     Image.Resampling.BILINEAR)
        mask = np.asarray(resized)
    return (mask >= 0.5).astype(np.uint8)


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
