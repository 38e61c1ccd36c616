"""The metadata beside an exported graph (``metadata.json``): what the graph takes and
returns, the image size and channels, the model and data versions, the normalisation
statistics and thresholds, the files with their sha256, and the equivalence check."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from importlib import metadata as dist_metadata
from pathlib import Path
from typing import Any

from components.errors import ModelFileError
from components.export.graph import INPUT_NAME, OUTPUT_NAMES

EXPORT_FORMAT = "nestad-export/1"
METADATA_FILE = "metadata.json"
BACKENDS = ("onnx", "openvino")  # exported formats; "torch" scores the detector.pt itself
MAIN_FILE = {"onnx": "model.onnx", "openvino": "model.xml"}
_TOOLS = {"onnx": ("torch", "onnx", "onnxruntime"), "openvino": ("torch", "onnx", "openvino")}


class ExportError(ModelFileError):
    """An export failed, disagrees with the PyTorch path, or is missing or altered."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return dist_metadata.version(dist)
    except dist_metadata.PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def build_metadata(
    backend: str,
    folder: Path,
    model_meta: dict[str, Any],
    statistics: dict[str, float],
    equivalence: dict[str, Any],
    model: dict[str, Any],
    data_version: str | None,
) -> dict[str, Any]:
    """The metadata of the export in ``folder`` (every file there is listed with its hash).

    ``model_meta``: what ``load_detector`` returned; ``statistics``: the detector's buffers
    (score_min, score_max, threshold, map_low, map_high); ``model``: name, sha256, source
    and version (None when the model was not exported from the registry).
    """
    norm = model_meta["norm"]
    norm = norm if isinstance(norm, dict) else asdict(norm)
    size, channels = model_meta["image_size"], model_meta["channels"]
    return {
        "format": EXPORT_FORMAT,
        "backend": backend,
        "main_file": MAIN_FILE[backend],
        "files": {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file()},
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
                  "shape": [None, size, size, channels],
                  "scaling": "inside the graph: x / 127.5 - 1"},
        "outputs": {
            OUTPUT_NAMES[0]: "raw score, float32 (N,)",
            OUTPUT_NAMES[1]: "normalised score in [0, 1] (validation normals' min/max), "
                             "float32 (N,)",
            OUTPUT_NAMES[2]: "normalised_score >= thresholds.value, bool (N,)",
            OUTPUT_NAMES[3]: "anomaly map normalised with map_low/map_high, clipped to "
                             "[0, 1], float32 (N, H, W)",
        },
        "image_size": size,
        "channels": channels,
        "model": {"generator": model_meta["model"]["name"], **model},
        "data_version": data_version,
        "normalisation": {k: statistics[k] for k in ("score_min", "score_max", "map_low",
                                                     "map_high")},
        "thresholds": {"used": model_meta["threshold"], "value": statistics["threshold"],
                       "fixed": norm["threshold_fixed"], "fpr": norm["threshold_fpr"],
                       "target_fpr": norm["target_fpr"]},
        "map_settings": model_meta.get("map_settings", {}),
        "image_rules": _plain(model_meta.get("image_rules")),  # what scoring must refuse
        "equivalence": equivalence,
        "tools": {dist: _version(dist) for dist in _TOOLS[backend]},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(folder: Path, backend: str | None = None) -> dict[str, Any]:
    """The metadata of the export in ``folder``, after checking that it is one (of
    ``backend``), that it passed its equivalence check, and that every file it lists is
    there with the recorded sha256."""
    path = Path(folder) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file (not a nestad export folder)") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable export metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a nestad export (format is not {EXPORT_FORMAT})")
    if backend is not None and meta.get("backend") != backend:
        raise ExportError(f"{path}: a {meta.get('backend')} export, not {backend}")
    if not (meta.get("equivalence") or {}).get("passed"):
        raise ExportError(f"{path}: the export did not pass its equivalence check")
    for name, digest in (meta.get("files") or {}).items():
        file = Path(folder) / name
        if not file.is_file():
            raise ExportError(f"{file}: missing from the export (listed in {METADATA_FILE})")
        if sha256_file(file) != digest:
            raise ExportError(f"{file}: altered since export (sha256 differs from "
                              f"{METADATA_FILE}); export again")
    if meta.get("main_file") not in (meta.get("files") or {}):
        raise ExportError(f"{path}: lists no {meta.get('main_file')}")
    return meta
