"""Pictures people look at: anomaly maps as heat overlays, grids of scored tiles, PNG text.

Pillow and numpy only. Maps come in already normalised to [0, 1] (``normalise_maps``), so
the colours mean the same thing on every image.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUTLINE = (255, 0, 255)  # mask contours: magenta does not occur in the turbo colour map
CAPTION_HEIGHT = 14  # pixels under each grid tile for the score line (default font ~11 px)


def _turbo_lut() -> np.ndarray:
    """256 turbo colours (Mikhailov 2019) from its published polynomial fit, (256, 3) uint8."""
    x = np.linspace(0.0, 1.0, 256)[:, None]
    # Coefficients of x^0..x^5 for red, green, blue (Ruofei Du's fit of Google's turbo).
    coefficients = np.array(
        [
            [0.13572138, 0.09140261, 0.10667330],
            [4.61539260, 2.19418839, 12.64194608],
            [-42.66032258, 4.84296658, -60.58204836],
            [132.13108234, -14.18503333, 110.36276771],
            [-152.94239396, 4.27729857, -89.90310912],
            [59.28637943, 2.82956604, 27.34824973],
        ]
    )
    rgb = (x ** np.arange(6)) @ coefficients  # (256, 3)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


_LUT = _turbo_lut()


def heat_colours(map01: np.ndarray) -> np.ndarray:
    """Turbo colours (dark blue = 0 ... dark red = 1) of a map, uint8 of shape map01.shape + (3,).

    Values are clipped to [0, 1]; NaN counts as 0.
    """
    values = np.nan_to_num(np.asarray(map01, dtype=np.float32), nan=0.0)
    index = np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    return _LUT[index]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """An (H, W), (H, W, 1) or (H, W, 3) uint8 image as (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8; got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3); got {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _resize_map(map01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D float map resized bilinearly to size = (H, W)."""
    values = np.asarray(map01, dtype=np.float32)
    if values.ndim == 3 and values.shape[0] == 1:  # (1, h, w) as the detector emits it
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"map must be (h, w); got {values.shape}")
    if values.shape == size:
        return values
    resized = Image.fromarray(values).resize(size[::-1], Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def overlay(image: np.ndarray, map01: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with its heat map blended in, an RGB picture of the image's size.

    The map is resized to the image bilinearly; each pixel's blend weight is
    ``alpha * map value``, so where the map is 0 the part shows unchanged.
    """
    rgb = _as_rgb(image).astype(np.float32)
    values = np.clip(np.nan_to_num(_resize_map(map01, rgb.shape[:2]), nan=0.0), 0.0, 1.0)
    weight = (alpha * values)[:, :, None]  # (H, W, 1)
    blended = (1.0 - weight) * rgb + weight * heat_colours(values).astype(np.float32)
    return Image.fromarray(np.round(blended).clip(0, 255).astype(np.uint8))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask: inside it, with a 4-neighbour outside (or the edge)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def outline_mask(picture: Image.Image, mask: np.ndarray) -> Image.Image:
    """The picture with the mask's boundary drawn in ``OUTLINE`` colour; the mask (any
    nonzero pixel is defect; (H, W) or (1, H, W)) is resized to the picture (nearest)."""
    binary = Image.fromarray((np.asarray(mask).squeeze() != 0).astype(np.uint8) * 255)
    edge = _outline(np.asarray(binary.resize(picture.size, Image.Resampling.NEAREST)) > 0)
    pixels = np.array(picture.convert("RGB"))
    pixels[edge] = OUTLINE
    return Image.fromarray(pixels)


def _caption(score: float, label: object | None) -> str:
    return f"{score:.3f}" if label is None else f"{label}  {score:.3f}"


def overlay_grid(
    images: Sequence[np.ndarray],
    maps01: Sequence[np.ndarray],
    scores: Sequence[float],
    labels: Sequence[object] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    columns: int = 4,
    tile: int = 128,
) -> Image.Image:
    """A grid of overlay tiles, row by row, each ``tile`` px square with a caption line under it.

    The caption holds the score (and the label when given); a given mask is outlined in
    ``OUTLINE`` colour. The picture is ``min(columns, n) * tile`` wide and
    ``ceil(n / columns) * (tile + CAPTION_HEIGHT)`` high.
    """
    count = len(images)
    if count == 0:
        raise ValueError("overlay_grid needs at least one image")
    lengths = {"maps01": len(maps01), "scores": len(scores)}
    lengths |= {"labels": len(labels)} if labels is not None else {}
    lengths |= {"masks": len(masks)} if masks is not None else {}
    wrong = {name: n for name, n in lengths.items() if n != count}
    if wrong:
        raise ValueError(f"expected {count} entries like images; got {wrong}")
    if columns < 1 or tile < 1:
        raise ValueError(f"columns and tile must be positive; got {columns}, {tile}")

    cols, rows = min(columns, count), math.ceil(count / columns)
    cell = tile + CAPTION_HEIGHT
    grid = Image.new("RGB", (cols * tile, rows * cell), color=(0, 0, 0))
    font = ImageFont.load_default()
    for i in range(count):
        picture = overlay(images[i], maps01[i]).resize((tile, tile), Image.Resampling.BILINEAR)
        if masks is not None:
            picture = outline_mask(picture, masks[i])
        # Draw each caption in its own cell, so a long one is clipped, not spilled onward.
        tile_cell = Image.new("RGB", (tile, cell), color=(0, 0, 0))
        tile_cell.paste(picture, (0, 0))
        label = None if labels is None else labels[i]
        caption = _caption(float(scores[i]), label)
        ImageDraw.Draw(tile_cell).text((2, tile + 1), caption, fill="white", font=font)
        grid.paste(tile_cell, ((i % columns) * tile, (i // columns) * cell))
    return grid


def png_base64(img: Image.Image) -> str:
    """The picture as PNG bytes in base64 text (ASCII), e.g. for an HTML ``<img src=data:...>``."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
