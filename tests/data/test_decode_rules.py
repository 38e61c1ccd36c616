"""The one decode (``components.data.images``), issue 12 items 1-3: pixel depths scaled by
their type's range, alpha onto black, palette/CMYK/animated/EXIF handled one way, the size
limit read from the header before any pixel is decoded, and one rule set for every path."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
from image_support import encode, grey_png, sixteen_bit_twin, with_declared_size
from PIL import Image, ImageFile

from components.config import DataConfig
from components.data.images import (
    ImageRules,
    decode_image,
    decode_image_original,
    image_rules,
    probe_image,
    read_image,
)
from components.errors import DataError

RULES = ImageRules(min_size=1, max_pixels=10_000)


def _grey(data: bytes) -> np.ndarray:
    return decode_image_original(data, "x", 1, RULES)[..., 0]


def _tiff(array: np.ndarray, sample_format: int | None = None) -> bytes:
    """A 1-band TIFF of ``array``; ``sample_format`` rewrites tag 339 (1 unsigned, 2 signed)."""
    data = bytearray(encode(Image.fromarray(array), "TIFF"))
    if sample_format is not None:
        at = data.find(b"\x53\x01\x03\x00\x01\x00\x00\x00")  # tag 339, SHORT, count 1
        assert at > 0
        data[at + 8 : at + 10] = sample_format.to_bytes(2, "little")
    return bytes(data)


# --- item 1: pixel formats ----------------------------------------------------------------


def test_16_bit_grey_keeps_its_high_byte_like_the_8_bit_picture() -> None:
    """The table's 16-bit PNG: once saturated to white, now the 8-bit picture exactly."""
    eight, sixteen, pixels = sixteen_bit_twin(0)
    assert Image.open(io.BytesIO(sixteen)).mode == "I;16"
    decoded = _grey(sixteen)
    assert np.array_equal(decoded, pixels) and np.array_equal(_grey(eight), pixels)
    assert 120 < decoded.mean() < 135  # not 254
    as_tiff = encode(Image.open(io.BytesIO(sixteen)), "TIFF")
    assert np.array_equal(_grey(as_tiff), pixels)


def test_16_bit_pgm_is_read_as_16_bit() -> None:
    pgm = b"P5\n2 2\n65535\n" + np.array([0, 40000, 65535, 256], ">u2").tobytes()
    assert _grey(pgm).ravel().tolist() == [0, 40000 >> 8, 255, 1]


def test_32_bit_integer_maps_the_type_range_signed_or_unsigned() -> None:
    values = np.array([[-(2**31), -1, 0, 2**31 - 1]], np.int32)
    assert _grey(_tiff(values)).ravel().tolist() == [0, 127, 128, 255]  # (v + 2**31) >> 24
    # The same bits declared unsigned (SampleFormat 1): 0..2**32-1, v >> 24.
    assert _grey(_tiff(values, sample_format=1)).ravel().tolist() == [128, 255, 0, 127]


def test_float_maps_0_1_to_0_255_clipped_and_nan_to_0() -> None:
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], np.float32)
    assert _grey(_tiff(values)).ravel().tolist() == [0, 128, 255, 255, 0, 0]


def test_alpha_is_composited_onto_black() -> None:
    rgba = encode(Image.new("RGBA", (2, 2), (200, 100, 50, 128)))
    assert decode_image_original(rgba, "x", 3, RULES)[0, 0].tolist() == [100, 50, 25]
    assert _grey(encode(Image.new("LA", (2, 2), (200, 255))))[0, 0] == 200  # opaque: as is
    assert _grey(encode(Image.new("LA", (2, 2), (200, 0))))[0, 0] == 0  # transparent: black
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    keyed = decode_image_original(encode(palette, transparency=0), "x", 3, RULES)
    assert keyed[0].tolist() == [[0, 0, 0], [40, 50, 60]]  # index 0 transparent
    colour_key = encode(Image.new("RGB", (2, 2), (9, 8, 7)), transparency=(9, 8, 7))
    assert decode_image_original(colour_key, "x", 3, RULES).max() == 0


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt: str) -> None:
    cmyk = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), fmt)  # pure red
    assert probe_image(cmyk, RULES).channels == 4
    red = decode_image_original(cmyk, "x", 3, RULES)[4, 4].astype(int)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_palette_1_bit_and_grey_convert_per_channels() -> None:
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 30, 60, 90])
    assert decode_image_original(encode(palette), "x", 3, RULES)[0, 0].tolist() == [30, 60, 90]
    assert _grey(encode(Image.new("1", (2, 2), 1)))[0, 0] == 255
    grey_as_rgb = decode_image_original(encode(Image.new("L", (2, 2), 77)), "x", 3, RULES)
    assert grey_as_rgb[0, 0].tolist() == [77, 77, 77]  # grey repeated
    rgb_as_grey = _grey(encode(Image.new("RGB", (2, 2), (255, 0, 0))))
    assert rgb_as_grey[0, 0] == 76  # ITU-R 601-2 luma: 0.299 * 255


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("L", (4, 4), value) for value in (10, 200)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert set(_grey(gif).ravel()) == {10}


def test_exif_orientation_is_applied() -> None:
    picture = Image.new("L", (6, 4), 0)
    picture.putpixel((0, 0), 255)  # top-left of the stored pixels
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(picture, exif=exif.tobytes())
    upright = _grey(data)
    assert upright.shape == (6, 4)  # (H, W): the viewer's portrait
    assert upright[0, -1] == 255 and upright.sum() == 255  # now top-right
    assert probe_image(data, RULES).width == 4
    _, original = decode_image(data, "x", 16, 1, RULES)
    assert original == (4, 6)


def test_formats_outside_the_list_and_unknown_modes_are_refused() -> None:
    icon = encode(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(DataError, match=r"x\.ico: not an image file .*accepted: BMP, GIF"):
        read_image(icon, "x.ico", 3, RULES)
    lab = encode(Image.new("LAB", (4, 4)), "TIFF")
    assert "pixel mode LAB is not supported" in probe_image(lab, RULES).error


# --- item 2: the size limit, from the header ----------------------------------------------


def test_the_limit_is_checked_from_the_header_before_any_decode(monkeypatch) -> None:
    def no_decoding(self):
        raise AssertionError("decoded an image over the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    bomb = with_declared_size(encode(Image.new("RGB", (8, 8))), 50_000, 40_000)
    with pytest.raises(DataError, match=r"^big\.png: image is 50000x40000 \(2000 megapixels\), "
                                         r"over the limit of 0\.01 megapixels \(data\."
                                         r"max_image_pixels=10000\); refused before decoding$"):
        read_image(bomb, "big.png", 3, RULES)
    probe = probe_image(bomb, RULES)
    assert (probe.width, probe.height) == (50_000, 40_000) and "refused" in probe.error


@pytest.mark.parametrize("side", [12_000, 14_000])  # 144 MP (Pillow warns), 196 MP (raises)
def test_pillow_bomb_sizes_give_nestads_error_and_no_warning(side: int) -> None:
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would raise here
        error = probe_image(grey_png(side, side, idat=b"\0"), image_rules(DataConfig())).error
    assert error.startswith(f"image is {side}x{side} ({side * side / 1e6:.4g} megapixels), "
                            "over the limit of 100 megapixels")
    assert before == Image.MAX_IMAGE_PIXELS  # Pillow's own limit is left as it was


def test_an_image_under_the_limit_but_over_pillows_threshold_decodes_without_warning() -> None:
    rules = ImageRules(min_size=1, max_pixels=200_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = probe_image(grey_png(10_000, 9_000), rules)  # 90 MP > Pillow's 89.5 MP
    assert probe.error is None and (probe.width, probe.height) == (10_000, 9_000)


def test_refusing_a_144_mp_png_takes_no_decode_memory(tmp_path) -> None:
    """A real 144-MP PNG (0.6 MB of file, 144 MB decoded): the peak memory of refusing it,
    in a fresh process, stays far below one decoded copy."""
    path = tmp_path / "big.png"
    path.write_bytes(grey_png(12_000, 12_000))
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from components.data.images import probe_image\n"
        "data = Path(sys.argv[1]).read_bytes()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "error = probe_image(data).error\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024, error)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                         text=True, check=True).stdout
    grown_mb, error = out.split(" ", 1)
    assert "over the limit of 100 megapixels" in error
    assert int(grown_mb) < 20  # MB; decoding would add at least 144


# --- item 3: one rule set -----------------------------------------------------------------


def test_the_rules_come_from_the_data_config() -> None:
    cfg = DataConfig(min_image_size=12, max_image_pixels=5000)
    assert image_rules(cfg) == ImageRules(min_size=12, max_pixels=5000)
    assert image_rules() == image_rules(DataConfig())
    assert image_rules().max_pixels == 100_000_000


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.new("L", (1, 1))),  # the table's 1x1 image
        with_declared_size(encode(Image.new("L", (8, 8))), 20_000, 20_000),
        b"GIF89a but not really",
    ],
    ids=["1x1", "over the limit", "garbage"],
)
def test_what_one_path_refuses_every_path_refuses_with_the_same_reason(data: bytes) -> None:
    """Ingestion and validation probe, training and scoring decode: one verdict, one text."""
    rules = image_rules(DataConfig())
    reason = probe_image(data, rules).error
    assert reason
    for decode in (lambda: decode_image(data, "f.png", 16, 3, rules),
                   lambda: decode_image_original(data, "f.png", 1, rules)):
        with pytest.raises(DataError) as excinfo:
            decode()
        assert str(excinfo.value) == f"f.png: {reason}"


def test_what_training_converts_every_path_accepts() -> None:
    rules = image_rules(DataConfig())
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([1, 2, 3])
    sources = [encode(Image.new(mode, (16, 16))) for mode in ("L", "LA", "RGB", "RGBA")]
    sources += [encode(palette, transparency=0), encode(Image.new("CMYK", (16, 16)), "JPEG"),
                sixteen_bit_twin(1, 16)[1]]
    for data in sources:
        probe = probe_image(data, rules)
        assert probe.error is None and probe.channels in (1, 2, 3, 4)
        for channels in (1, 3):
            array, size = decode_image(data, "x", 16, channels, rules)
            assert array.shape == (16, 16, channels) and size == (16, 16)
