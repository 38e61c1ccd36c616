"""Scoring requests for the served model: a table of images in, a table of scores out.

No MLflow here: ``components.registry.pyfunc`` wraps these functions in the MLflow pyfunc model
that ``mlflow models serve`` exposes. A request is a DataFrame with one row per image and
two string columns, each row filling exactly one:

- ``image_b64``: the image file's bytes (PNG, JPEG, ...), base64-encoded;
- ``path``: an image file readable *on the scoring host* (for local batch use).

REST (``POST /invocations``, ``Content-Type: application/json``)::

    {"dataframe_split": {"columns": ["image_b64"], "data": [["iVBORw0KGgo..."]]},
     "params": {"threshold": "fixed"}}

``params`` is optional (``threshold``: ``fpr`` | ``fixed``; default: the model's; ``maps``:
``true`` | ``false``, default false). The answer is
``{"predictions": [{"score": 0.41, "normalised_score": 0.27, "is_anomaly": true}, ...]}``,
one entry per row, in order: the raw score A, A normalised with the validation normals'
min and max, and whether it reaches the threshold. With ``"maps": true`` every entry also
has ``map_png``: a base64 PNG of the image *at the model input size* (as it was scored)
with its normalised anomaly map blended in as a heat map (``overlay``).
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from components.data.images import ImageRules, decode_image, to_model_input
from components.detector.overlay import overlay, png_base64
from components.detector.score import AnomalyDetector
from components.errors import DataError

INPUT_COLUMNS = ("path", "image_b64")
OUTPUT_COLUMNS = ("score", "normalised_score", "is_anomaly")
MAP_COLUMN = "map_png"  # only with maps=True: base64 PNG overlay at the model input size
THRESHOLDS = ("fpr", "fixed")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold (``serve.*``; these defaults are ``ServeConfig``'s)."""

    max_image_bytes: int = 64 * 2**20  # one image file: image_b64 decoded, or a path's file
    max_request_bytes: int = 256 * 2**20  # all the request's image files together


class RequestRowError(DataError):
    """A request the scorer refuses: ``row`` is the 0-based row at fault (None: the request
    as a whole), ``reason`` says why; ``too_large`` marks a size limit (HTTP 413, else 400)."""

    def __init__(self, row: int | None, reason: str, too_large: bool = False) -> None:
        self.row, self.reason, self.too_large = row, reason, too_large
        super().__init__(f"request row {row}: {reason}" if row is not None
                         else f"request: {reason}")


def encode_image(data: bytes | Path) -> str:
    """Base64 text of an image file's bytes (or of the file at a path), for ``image_b64``."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    return base64.b64encode(raw).decode("ascii")


def _cell(value: Any) -> str | None:
    """A request cell as text; missing values (None, NaN, "") become None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text or None


def _too_large(row: int, what: str, size: int, limits: RequestLimits) -> RequestRowError:
    return RequestRowError(row, f"{what} is {size:,} bytes, above serve.max_image_bytes="
                                f"{limits.max_image_bytes:,}", too_large=True)


def _row_bytes(row: int, path: str | None, b64: str | None,
               limits: RequestLimits) -> tuple[str, bytes]:
    """A row's image file bytes; sizes are checked before anything is decoded or read."""
    if (path is None) == (b64 is None):
        raise RequestRowError(row, "give exactly one of 'path' or 'image_b64'")
    if b64 is not None:
        size = len(b64) * 3 // 4 - (len(b64) - len(b64.rstrip("=")))  # the decoded length
        if size > limits.max_image_bytes:
            raise _too_large(row, "'image_b64' decoded", size, limits)
        try:
            return f"row {row}", base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise RequestRowError(row, "'image_b64' is not valid base64") from None
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > limits.max_image_bytes:
            raise _too_large(row, str(file), size, limits)
        return str(file), file.read_bytes()
    except OSError as exc:
        raise RequestRowError(row, f"cannot read {file} ({exc.strerror})") from None


def request_images(frame: pd.DataFrame, image_size: int, channels: int,
                   rules: ImageRules | None = None,
                   limits: RequestLimits | None = None) -> torch.Tensor:
    """Decode a request's rows into uint8 images (N, C, H, W), as evaluation decodes them
    and by its ``rules`` (default: the config defaults): sizes are checked from each
    image's header before it is decoded. A row refused (``limits``, default
    ``RequestLimits()``) raises ``RequestRowError`` naming it."""
    limits = limits or RequestLimits()
    unknown = [c for c in frame.columns if c not in INPUT_COLUMNS]
    if unknown or not any(c in frame.columns for c in INPUT_COLUMNS):
        raise RequestRowError(
            None, f"columns {list(frame.columns)}: expected a 'path' and/or "
            "an 'image_b64' column (one image per row)"
        )
    paths = frame["path"] if "path" in frame else [None] * len(frame)
    blobs = frame["image_b64"] if "image_b64" in frame else [None] * len(frame)
    out = np.empty((len(frame), image_size, image_size, channels), dtype=np.uint8)
    total = 0
    for i, (path, b64) in enumerate(zip(paths, blobs, strict=True)):
        name, data = _row_bytes(i, _cell(path), _cell(b64), limits)
        total += len(data)
        if total > limits.max_request_bytes:
            raise RequestRowError(i, f"the images up to this row are {total:,} bytes, above "
                                     f"serve.max_request_bytes={limits.max_request_bytes:,}",
                                  too_large=True)
        try:
            out[i], _ = decode_image(data, name, image_size, channels, rules)
        except RequestRowError:
            raise
        except DataError as exc:  # the decoder names the image: row i or the path
            raise RequestRowError(i, str(exc).removeprefix(f"row {i}: ")) from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def score_request(
    detector: AnomalyDetector,
    meta: dict[str, Any],
    frame: pd.DataFrame,
    threshold: str | None = None,
    batch_size: int = 256,
    maps: bool = False,
    limits: RequestLimits | None = None,
) -> pd.DataFrame:
    """Score every row of a request; columns ``OUTPUT_COLUMNS`` (plus ``MAP_COLUMN`` with
    ``maps``), one row per input row.

    Scores match ``nestad score`` exactly: same decoding, same batches, same model. Maps are
    ``AnomalyDetector.score_with_maps``'s, drawn over the decoded (model-size) image.
    """
    if threshold is not None and threshold not in THRESHOLDS:
        raise DataError(f"threshold {threshold!r}: expected one of {', '.join(THRESHOLDS)}")
    images = request_images(frame, meta["image_size"], meta["channels"], meta.get("image_rules"),
                            limits)
    cut = meta["norm"].threshold(threshold or meta["threshold"])
    scores, normed, pictures = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        if maps:
            a, n, _, maps01 = detector.score_with_maps(to_model_input(chunk))
            pixels = chunk.permute(0, 2, 3, 1).numpy()  # (B, H, W, C) uint8
            pictures += [png_base64(overlay(p, m[0].numpy())) for p, m in zip(pixels, maps01,
                                                                                strict=True)]
        else:
            a, n, _ = detector(to_model_input(chunk))
        scores.append(a)
        normed.append(n)
    if not scores:
        columns = zip(OUTPUT_COLUMNS, ("float64", "float64", "bool"), strict=True)
        empty = {c: pd.Series(dtype=t) for c, t in columns}
        if maps:
            empty[MAP_COLUMN] = pd.Series(dtype=object)
        return pd.DataFrame(empty)
    score = torch.cat(scores).numpy()
    norm = torch.cat(normed).numpy()
    out = pd.DataFrame({"score": score, "normalised_score": norm, "is_anomaly": norm >= cut})
    if maps:
        out[MAP_COLUMN] = pictures
    return out


def example_request(image_size: int, channels: int) -> pd.DataFrame:
    """A one-row request (a mid-grey PNG) to document and check the served signature."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L" if channels == 1 else "RGB", (image_size, image_size), 128).save(buf, "PNG")
    return pd.DataFrame({"image_b64": [encode_image(buf.getvalue())]})
