"""One image's bytes: the one decode every path uses (training, ingestion, validation,
``nestad score`` and the REST scorer), then resize into uint8 arrays, scale to the model's
[-1, 1] input; decode a pixel mask with the same geometry.

The rules (``ImageRules``, from ``data.min_image_size`` and ``data.max_image_pixels``) and
the conversions are decided here only, so an image one path accepts every path accepts:

- **Formats**: ``ACCEPTED_FORMATS`` (Pillow opens no other format: fewer parsers see
  untrusted bytes). An animated file (GIF, APNG, WebP, MPO) gives its first frame.
- **Size**: width x height at most ``max_pixels``, read from the header before any pixel
  is decoded (memory stays bounded; Pillow's own decompression-bomb check is replaced by
  this one); the shorter side at least ``min_size``.
- **Orientation**: the EXIF orientation tag is applied (the image as a viewer shows it).
- **Depth**: linear in the sample type's full range, never per image (so scores compare
  between images): 16-bit ``v >> 8`` (what Pillow does to 16-bit colour PNGs); 32-bit
  integer ``v >> 24`` (unsigned) or ``(v + 2**31) >> 24`` (signed, as a TIFF's sample
  format says; Pillow's mode ``I`` from PNG or PGM holds 16-bit values and is read as
  16-bit); float ``[0, 1] -> [0, 255]`` (clipped, NaN -> 0).
- **Alpha**: composited onto black (colour x alpha / 255), for LA, RGBA, palette with
  transparency and colour-key transparency alike.
- **Colour**: palette, CMYK (Pillow's conversion, no ICC profile), YCbCr and HSV become
  RGB; 1-bit and the depths above become grey. Then ``channels`` decides: grey -> RGB
  repeats the grey, RGB -> grey is ITU-R 601-2 luma (Pillow's ``convert("L")``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.errors import DataError

if TYPE_CHECKING:  # torch is imported where tensors are made: ingestion and validation
    import torch  # read and hash images without it (seconds less per stage process)

    from components.config import DataConfig

Progress = Callable[[int], None]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Pillow format -> the suffix a stored copy gets. The only formats any path accepts.
ACCEPTED_FORMATS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "PPM": ".ppm",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "GIF": ".gif",
}
_OPENERS = [f for f in ACCEPTED_FORMATS if f != "MPO"]  # Pillow's JPEG opener reads MPO
_FORMAT_NAMES = ", ".join(sorted(_OPENERS))
# Source modes and how they become 8-bit grey ("L") or colour ("RGB").
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_COLOUR_MODES = {"P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"}
SOURCE_BANDS = (1, 2, 3, 4)  # band counts of those modes (grey, grey+alpha, RGB, RGBA/CMYK)
_ORIENTATION = 0x0112  # EXIF tag


@dataclass(frozen=True)
class ImageRules:
    """What every path accepts: ``image_rules(data_cfg)`` builds them from the config."""

    min_size: int  # the shorter side, in pixels (data.min_image_size)
    max_pixels: int  # width x height, checked from the header (data.max_image_pixels)


def image_rules(cfg: DataConfig | None = None) -> ImageRules:
    """The rules of ``cfg`` (default: ``DataConfig()``'s, e.g. for a model file that
    predates stored rules)."""
    if cfg is None:
        from components.config import DataConfig

        cfg = DataConfig()
    return ImageRules(min_size=cfg.min_image_size, max_pixels=cfg.max_image_pixels)


def _as_rules(rules: ImageRules | int | None) -> ImageRules:
    """``rules``, the config defaults for None, or the defaults with a bare int as the
    minimum side (the older ``min_size`` argument)."""
    if isinstance(rules, ImageRules):
        return rules
    defaults = image_rules()
    if rules is None:
        return defaults
    return ImageRules(min_size=int(rules), max_pixels=defaults.max_pixels)


class _Refused(Exception):
    """Why an image is refused; the caller prefixes the file's name. ``size``: the
    header's (width, height) when the size was the reason."""

    def __init__(self, reason: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(reason)
        self.size = size


# Pillow's decompression-bomb check (a process-wide limit, a warning above it, an error at
# twice it) is suspended while nestad opens an image: ``max_pixels``, checked from the
# header, replaces it. Counted, so concurrent decoding threads restore it exactly once.
_bomb_lock = threading.Lock()
_bomb_users = 0
_bomb_saved: int | None = None


@contextlib.contextmanager
def _own_size_limit() -> Iterator[None]:
    global _bomb_users, _bomb_saved
    with _bomb_lock:
        if _bomb_users == 0:
            _bomb_saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _bomb_users += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_users -= 1
            if _bomb_users == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


def _check_size(size: tuple[int, int], rules: ImageRules, when: str) -> None:
    width, height = size
    if width * height > rules.max_pixels:
        raise _Refused(
            f"image is {width}x{height} ({width * height / 1e6:.4g} megapixels), over the "
            f"limit of {rules.max_pixels / 1e6:.4g} megapixels (data.max_image_pixels="
            f"{rules.max_pixels}); refused {when}", size
        )
    if min(width, height) < rules.min_size:
        raise _Refused(
            f"image is {width}x{height}, smaller than the allowed minimum "
            f"{rules.min_size}x{rules.min_size} (data.min_image_size)", size
        )


def _by_rows(array: np.ndarray, scale: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``scale`` applied in blocks of rows (bounded temporaries) into a uint8 array."""
    out = np.empty(array.shape[:2], dtype=np.uint8)
    step = max(1, (1 << 22) // max(1, array.shape[1]))  # about 4 M pixels per block
    for row in range(0, array.shape[0], step):
        out[row : row + step] = scale(array[row : row + step])
    return out


def _integer_bits(img: Image.Image) -> tuple[int, bool]:
    """Bits and signedness of a mode ``I`` image's samples: a TIFF says (BitsPerSample,
    SampleFormat); Pillow's other ``I`` images (PNG, PGM) hold 16-bit unsigned values."""
    tags = getattr(img, "tag_v2", None)
    if img.format == "TIFF" and tags is not None:
        bits = tags.get(258, (32,))
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        fmt = tags.get(339, (1,))
        signed = int(fmt[0] if isinstance(fmt, tuple) else fmt) == 2
        if bits in (8, 16, 32):
            return bits, signed
    return 16, False


def _to_8bit(img: Image.Image) -> Image.Image:
    """An upright-agnostic conversion of a loaded image to 8-bit ``L`` or ``RGB`` (module
    docstring: depth, alpha, colour)."""
    mode = img.mode
    if mode in ("L", "RGB") and "transparency" not in img.info:
        return img
    if mode.startswith("I;16"):
        return Image.fromarray(_by_rows(np.asarray(img), lambda a: a >> 8), "L")
    if mode == "I":
        bits, signed = _integer_bits(img)
        array = np.asarray(img)  # int32
        if bits == 32:
            offset = np.uint32(1 << 31) if signed else np.uint32(0)
            scaled = _by_rows(array.view(np.uint32), lambda a: (a ^ offset) >> 24)
        else:
            low = -(1 << (bits - 1)) if signed else 0
            shift, top = bits - 8, 255
            scaled = _by_rows(array, lambda a: ((a.astype(np.int64) - low) >> shift).clip(0, top))
        return Image.fromarray(scaled, "L")
    if mode == "F":
        array = np.asarray(img)
        scaled = _by_rows(array, lambda a: np.rint(np.nan_to_num(a, nan=0.0).clip(0, 1) * 255))
        return Image.fromarray(scaled, "L")
    if mode == "1":
        return img.convert("L")
    if "transparency" in img.info and mode in ("L", "RGB", "P"):
        img = img.convert("LA" if mode == "L" else "RGBA")  # the colour key becomes alpha
        mode = img.mode
    if mode in ("LA", "La"):
        return (img if mode == "La" else img.convert("La")).getchannel(0)  # over black
    if mode in ("PA", "RGBA", "RGBa"):
        premultiplied = img if mode == "RGBa" else img.convert("RGBA").convert("RGBa")
        return Image.merge("RGB", premultiplied.split()[:3])  # composited over black
    return img.convert("RGB")  # P, RGBX, CMYK, YCbCr, HSV


@functools.cache
def _quiet_metadata_warnings() -> None:
    """Silence Pillow's warnings about corrupt TIFF/EXIF metadata, process-wide, from the
    first decode on. The pixels decode without it (or the decode fails with nestad's one
    named error), so the lines ("Corrupt EXIF data", "Tag data larger than file") only
    came before that error or a valid score as noise. A filter, not ``catch_warnings``:
    decoding runs in threads, and ``catch_warnings`` is not thread-safe."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


def _decode(data: bytes, rules: ImageRules) -> tuple[Image.Image, int, str]:
    """The one decode: ``(8-bit L or RGB image, upright; the source's band count; its
    Pillow format)``, or ``_Refused`` saying why."""
    _quiet_metadata_warnings()
    try:
        with _own_size_limit(), Image.open(io.BytesIO(data), formats=_OPENERS) as img:
            _check_size(img.size, rules, "before decoding")  # the header's size only
            if img.mode not in _GREY_MODES | _COLOUR_MODES:
                raise _Refused(f"pixel mode {img.mode} is not supported (grey, RGB, RGBA, "
                               "palette, CMYK, YCbCr, 16-bit, 32-bit or float)")
            img.load()  # the full decode (first frame): truncated or corrupt data fails here
            _check_size(img.size, rules, "after decoding")  # a frame may enlarge a GIF
            fmt, bands = img.format or "", len(img.getbands())
            if img.getexif().get(_ORIENTATION, 1) in range(2, 9):
                img = ImageOps.exif_transpose(img)
            return _to_8bit(img), bands, fmt
    except _Refused:
        raise
    except UnidentifiedImageError:
        raise _Refused(f"not an image file (cannot identify its format; accepted: "
                       f"{_FORMAT_NAMES})") from None
    except Exception as exc:  # noqa: BLE001 -- any failure of a decoder on these bytes
        raise _Refused(f"unreadable or truncated image ({type(exc).__name__}: {exc})") from None


def _read(data: bytes, name: str, channels: int, rules: ImageRules | int | None
          ) -> tuple[Image.Image, int]:
    """``read_image`` and the source's band count, from one decode."""
    try:
        img, bands, _ = _decode(data, _as_rules(rules))
    except _Refused as exc:
        raise DataError(f"{name}: {exc}") from None
    want = "L" if channels == 1 else "RGB"
    return (img if img.mode == want else img.convert(want)), bands


def read_image(data: bytes, name: str, channels: int,
               rules: ImageRules | int | None = None) -> Image.Image:
    """Decode ``data`` by the rules into an upright 8-bit ``L`` (``channels`` 1) or ``RGB``
    image at its own size; ``DataError`` naming ``name`` and the reason otherwise."""
    return _read(data, name, channels, rules)[0]


@dataclass(frozen=True)
class ImageProbe:
    """One full decode: the image's own (upright) size and its source band count, or why
    it was refused."""

    width: int = 0
    height: int = 0
    channels: int = 0
    suffix: str = ""
    error: str | None = None


def probe_image(data: bytes, rules: ImageRules | int | None = None) -> ImageProbe:
    """Decode ``data`` by the rules; its size, band count and canonical suffix, or the
    reason it is refused (what training would refuse)."""
    try:
        img, bands, fmt = _decode(data, _as_rules(rules))
    except _Refused as exc:
        width, height = exc.size or (0, 0)  # a size refusal still tells the size
        return ImageProbe(width, height, error=str(exc))
    return ImageProbe(img.width, img.height, bands, ACCEPTED_FORMATS[fmt])


def decode_image(data: bytes, name: str, image_size: int, channels: int,
                 rules: ImageRules | int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, check and resize one image to ``(image_size, image_size, channels)`` uint8.

    Also returns the original (upright) ``(width, height)``.
    """
    array, original, _ = decode_image_and_bands(data, name, image_size, channels, rules)
    return array, original


def decode_image_and_bands(data: bytes, name: str, image_size: int, channels: int,
                           rules: ImageRules | int | None = None
                           ) -> tuple[np.ndarray, tuple[int, int], int]:
    """``decode_image`` plus the source's band count (1 grey, 3 RGB, 4 RGBA/CMYK ...), from
    the same single decode."""
    img, bands = _read(data, name, channels, rules)
    original = img.size
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return (array[..., None] if channels == 1 else array), original, bands


def decode_image_original(data: bytes, name: str, channels: int,
                          rules: ImageRules | int | None = None) -> np.ndarray:
    """Decode and check one image at its own size: ``(height, width, channels)`` uint8.

    What ``decode_image`` decodes before it resizes (same checks, same errors, same
    conversion), e.g. to draw a heat map over the source image at its original size.
    """
    array = np.asarray(read_image(data, name, channels, rules), dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def decode_mask(data: bytes, name: str, image_size: int, image_name: str,
                image_wh: tuple[int, int], rules: ImageRules | int | None = None) -> np.ndarray:
    """Decode one pixel mask to ``(image_size, image_size)`` uint8 in {0, 1}.

    The mask (decoded as its image is, read as 8-bit grey) must have its image's original
    ``image_wh`` (width, height); it is binarised at 128 (>= 128 is defect), then resized
    exactly as ``decode_image`` resizes the image -- to a square, aspect not kept, bilinear
    (Pillow's, on the {0, 1} mask as floats) -- and thresholded at 0.5, so a mask pixel is 1
    where at least half of what the model-input pixel covers is defect.
    """
    limit = _as_rules(rules).max_pixels  # the size that matters is its image's (below)
    try:
        img, _, _ = _decode(data, ImageRules(min_size=1, max_pixels=limit))
    except _Refused as exc:
        raise DataError(f"{name}: {exc}") from None
    if img.size != tuple(image_wh):
        raise DataError(
            f"{name}: mask is {img.size[0]}x{img.size[1]} but its image {image_name} is "
            f"{image_wh[0]}x{image_wh[1]}; a mask must have its image's size"
        )
    mask = (np.asarray(img.convert("L"), dtype=np.uint8) >= 128).astype(np.float32)
    if mask.shape != (image_size, image_size):
        resized = Image.fromarray(mask, "F").resize((image_size, image_size),
                                                     Image.Resampling.BILINEAR)
        mask = np.asarray(resized)
    return (mask >= 0.5).astype(np.uint8)


def decode_images(items: list[tuple[str, bytes]], image_size: int, channels: int,
                  rules: ImageRules | int | None = None, workers: int = 2,
                  progress: Progress | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Decode many images in parallel: ``(N, C, H, W)`` uint8 and original ``(N, 2)`` sizes."""
    import torch

    rules = _as_rules(rules)
    out = np.empty((len(items), image_size, image_size, channels), dtype=np.uint8)
    sizes = np.zeros((len(items), 2), dtype=np.int64)

    def work(i: int) -> None:
        name, data = items[i]
        out[i], sizes[i] = decode_image(data, name, image_size, channels, rules)

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
