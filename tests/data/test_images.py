"""One image's decode: at the model size (``decode_image``) and at its own size
(``decode_image_original``), which agree once the original is resized the same way."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from components.data.images import ImageRules, decode_image, decode_image_original
from components.errors import DataError


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
def test_original_size_decode_matches_the_resized_decode(synth, channels: int) -> None:
    source = synth.image("blob", 3, 48).resize((40, 24))  # non-square: width 40, height 24
    data = _png(source)
    full = decode_image_original(data, "x.png", channels)
    assert full.shape == (24, 40, channels) and full.dtype == np.uint8
    resized, original = decode_image(data, "x.png", 16, channels)
    assert original == (40, 24)
    mode = "L" if channels == 1 else "RGB"
    again = Image.fromarray(full.squeeze(-1) if channels == 1 else full, mode)
    again = np.asarray(again.resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(again.reshape(resized.shape), resized)


def test_original_size_decode_errors_name_the_file(synth) -> None:
    with pytest.raises(DataError, match="x.png: not an image file"):
        decode_image_original(b"not an image", "x.png", 3)
    data = _png(synth.image("blob", 0, 32))
    with pytest.raises(DataError, match="x.png: unreadable or truncated"):
        decode_image_original(data[:60], "x.png", 3)
    with pytest.raises(DataError, match="smaller than the allowed minimum 64x64"):
        decode_image_original(data, "x.png", 3, ImageRules(min_size=64, max_pixels=10**8))
