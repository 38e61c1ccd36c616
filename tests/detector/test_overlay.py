"""Overlay pictures: sizes, blending, mask outlines and PNG text."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from components.detector.overlay import (
    CAPTION_HEIGHT,
    OUTLINE,
    heat_colours,
    overlay,
    overlay_grid,
    png_base64,
)


def _image(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def test_heat_colours_shape_and_range() -> None:
    colours = heat_colours(np.linspace(-0.5, 1.5, 12).reshape(3, 4))
    assert colours.shape == (3, 4, 3) and colours.dtype == np.uint8
    assert not np.array_equal(colours[0, 0], colours[-1, -1])
    assert np.array_equal(heat_colours(np.array([[-1.0, np.nan]])), heat_colours(np.zeros((1, 2))))


@pytest.mark.parametrize("shape", [(40, 30), (40, 30, 1), (40, 30, 3)])
@pytest.mark.parametrize("map_shape", [(8, 6), (40, 30), (100, 10)])
def test_overlay_has_the_image_size(shape: tuple[int, ...], map_shape: tuple[int, int]) -> None:
    picture = overlay(_image(shape), np.random.default_rng(1).random(map_shape))
    assert picture.mode == "RGB" and picture.size == (30, 40)  # PIL sizes are (W, H)


def test_overlay_blends_only_where_the_map_is_high() -> None:
    image = _image((16, 16, 3))
    assert np.array_equal(np.asarray(overlay(image, np.zeros((4, 4)))), image)
    full = np.asarray(overlay(image, np.ones((4, 4)), alpha=1.0))
    assert np.array_equal(full, heat_colours(np.ones((16, 16))))


def test_overlay_rejects_bad_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        overlay(np.zeros((8, 8), dtype=np.float32), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="H, W"):
        overlay(np.zeros((8, 8, 2), dtype=np.uint8), np.zeros((8, 8)))


def test_grid_size_follows_columns_and_tile() -> None:
    images = [_image((20, 20))] * 5
    maps = [np.zeros((5, 5))] * 5
    grid = overlay_grid(images, maps, [0.1] * 5, columns=3, tile=32)
    assert grid.size == (3 * 32, 2 * (32 + CAPTION_HEIGHT))
    assert overlay_grid(images[:2], maps[:2], [0.1, 0.2], columns=4, tile=16).size == (
        2 * 16,
        16 + CAPTION_HEIGHT,
    )


def test_grid_outlines_masks_and_writes_captions() -> None:
    image = np.full((32, 32), 100, dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    grid = overlay_grid(
        [image], [np.zeros((8, 8))], [0.75], labels=["crack"], masks=[mask], tile=32
    )
    pixels = np.asarray(grid)
    for y, x in [(8, 8), (8, 15), (23, 20), (16, 8)]:  # the square's boundary
        assert tuple(pixels[y, x]) == OUTLINE
    for y, x in [(16, 16), (2, 2), (30, 30)]:  # inside and outside it
        assert tuple(pixels[y, x]) == (100, 100, 100)
    assert pixels[32:].max() > 0  # the caption line was drawn


def test_grid_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="scores"):
        overlay_grid([_image((8, 8))] * 2, [np.zeros((8, 8))] * 2, [0.1])


def test_png_base64_round_trips() -> None:
    picture = overlay(_image((24, 20)), np.zeros((6, 5)))
    decoded = Image.open(io.BytesIO(base64.b64decode(png_base64(picture))))
    assert decoded.format == "PNG" and decoded.size == (20, 24)
