"""``export_detector``: build the graph in a temporary folder beside the target, check it
against the PyTorch path, and only then write the metadata and move the folder into place.

A failed build or check leaves the target as it was (absent, or the previous export).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.detector.score import AnomalyDetector
from components.export.equivalence import EquivalenceReport, check_equivalence
from components.export.graph import ExportGraph, sample_input
from components.export.metadata import (
    BACKENDS,
    MAIN_FILE,
    METADATA_FILE,
    ExportError,
    build_metadata,
    write_metadata,
)


@dataclass(frozen=True)
class ExportResult:
    """A verified export: its folder, metadata and equivalence report."""

    folder: Path
    metadata: dict[str, Any]
    report: EquivalenceReport


def _check_target(out: Path) -> None:
    """Refuse a target that exists and is not an (empty folder or) earlier export."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / METADATA_FILE).is_file())):
        raise ExportError(f"--out {out}: exists and is not a nestad export folder; "
                          "choose a new or empty folder")


def _build(graph: ExportGraph, backend: str, size: int, channels: int, folder: Path) -> Path:
    from components.export.onnx import export_onnx

    sample = sample_input(size, channels)
    if backend == "onnx":
        return export_onnx(graph, sample, folder / MAIN_FILE["onnx"])
    from components.export.openvino import export_openvino

    with tempfile.TemporaryDirectory(prefix="nestad-onnx-") as tmp:
        onnx_file = export_onnx(graph, sample, Path(tmp) / "model.onnx")
        return export_openvino(onnx_file, folder / MAIN_FILE["openvino"])


def _runner(backend: str, path: Path):  # noqa: ANN202 - a callable
    if backend == "onnx":
        from components.export.onnx import onnx_runner

        return onnx_runner(path)
    from components.export.openvino import openvino_runner

    return openvino_runner(path)


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_detector(
    detector: AnomalyDetector,
    model_meta: dict[str, Any],
    backend: str,
    out: Path,
    images: torch.Tensor,
    images_from: str,
    *,
    model: dict[str, Any] | None = None,
    data_version: str | None = None,
    tolerance: float | None = None,
) -> ExportResult:
    """Export ``detector`` (CPU) as ``backend`` into ``out``, verified on uint8
    ``(N, C, H, W)`` ``images`` (described by ``images_from``); raise ``ExportError``, with
    nothing written to ``out``, when the build or the check fails."""
    if backend not in BACKENDS:
        raise ExportError(f"--format {backend!r}: expected one of {', '.join(BACKENDS)}")
    out = Path(out)
    _check_target(out)
    size, channels = model_meta["image_size"], model_meta["channels"]
    if tuple(images.shape[1:]) != (channels, size, size):
        raise ExportError(f"equivalence images ({images_from}) are {tuple(images.shape[1:])}, "
                          f"the model takes {(channels, size, size)}")
    detector = detector.cpu().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        path = _build(ExportGraph(detector), backend, size, channels, tmp)
        report = check_equivalence(detector, _runner(backend, path), images, backend,
                                   images_from, tolerance)
        if not report.passed:
            raise ExportError(report.failure() + f"; nothing written to {out}")
        statistics = {k: float(getattr(detector, k)) for k in
                      ("score_min", "score_max", "threshold", "map_low", "map_high")}
        meta = build_metadata(backend, tmp, model_meta, statistics, report.as_dict(),
                              model or {}, data_version)
        write_metadata(tmp, meta)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, meta, report)
