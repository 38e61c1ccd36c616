"""Image files the decoder tests need and Pillow does not write: PNGs crafted chunk by
chunk (huge declared sizes with valid CRCs), 16-bit and 32-bit files, seeded corruptions."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """An 8-bit grey PNG declaring ``width`` x ``height``. Without ``idat`` the pixels are a
    valid all-black zlib stream (a real image, whatever its size: a 144-MP file is 0.6 MB);
    with ``idat`` those bytes stand in for it (a header-only "bomb")."""
    if idat is None:
        packer = zlib.compressobj(1)
        rows = 500
        block = bytes((width + 1) * rows)  # filter byte 0 + one zero byte per pixel
        parts = [packer.compress(block) for _ in range(height // rows)]
        parts.append(packer.compress(bytes((width + 1) * (height % rows))))
        idat = b"".join(parts) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR width and height replaced, the CRC recomputed (valid header)."""
    start = len(PNG_SIGNATURE)
    length = struct.unpack(">I", png[start : start + 4])[0]
    body = struct.pack(">II", width, height) + png[start + 16 : start + 8 + length]
    return png[:start] + png_chunk(b"IHDR", body) + png[start + 12 + length :]


def sixteen_bit_twin(seed: int, size: int = 24) -> tuple[bytes, bytes, np.ndarray]:
    """The same picture as an 8-bit and a 16-bit grey PNG (16-bit = 8-bit x 257 plus noise
    in the low byte, so ``>> 8`` gives the 8-bit picture back) and its 8-bit pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    eight = ((xx + yy) * 255 // (2 * size - 2)).astype(np.uint8)  # a gradient, mean ~128
    sixteen = eight.astype(np.uint16) * 256 + rng.integers(0, 256, eight.shape, dtype=np.uint16)
    return encode(Image.fromarray(eight, "L")), encode(Image.fromarray(sixteen)), eight


def corrupt(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded corruption: truncation, bit flips, a rewritten header byte run, or (for a
    PNG) a huge declared size with a valid CRC."""
    kind = rng.integers(4)
    if kind == 0:
        return data[: int(rng.integers(0, len(data)))]
    if kind == 1:
        out = bytearray(data)
        for at in rng.integers(0, len(out), size=int(rng.integers(1, 9))):
            out[at] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if kind == 2:
        out = bytearray(data)
        at = int(rng.integers(0, min(len(out), 64)))
        run = rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        out[at : at + len(run)] = run
        return bytes(out)
    if data.startswith(PNG_SIGNATURE):
        side = int(rng.choice([1 << 14, 1 << 16, (1 << 31) - 1]))
        return with_declared_size(data, side, int(rng.integers(1, side)))
    return data[: len(data) // 2]
