"""Run a verified export: its metadata checked, then onnxruntime or OpenVINO.

``ExportedDetector`` scores like ``AnomalyDetector`` (``detector(x)``,
``detector.score_with_maps(x)`` on model input in [-1, 1]) so the scoring code is the same
whatever the backend; it gives the graph back the uint8 images ``x`` was made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from components.export.equivalence import Runner
from components.export.locate import find_export
from components.export.metadata import ExportError, read_metadata


def load_runner(folder: Path, backend: str, threads: int | None = None
                ) -> tuple[Runner, dict[str, Any]]:
    """The graph in ``folder`` as a function uint8 (N, H, W, C) -> outputs, and its
    metadata (checked: a ``backend`` export that passed its check, files unaltered)."""
    meta = read_metadata(folder, backend)
    path = Path(folder) / meta["main_file"]
    if backend == "onnx":
        from components.export.onnx import onnx_runner

        return onnx_runner(path, threads), meta
    from components.export.openvino import openvino_runner

    return openvino_runner(path, threads), meta


def _rules(stored: dict[str, Any] | None) -> Any:
    """The decoding rules training applied (None: the defaults), as scoring takes them."""
    if stored is None:
        return None
    from components.data.images import ImageRules

    return ImageRules(**stored)


class ExportedDetector:
    """An exported graph behind ``AnomalyDetector``'s scoring interface."""

    def __init__(self, runner: Runner, meta: dict[str, Any], threshold: str | None = None
                 ) -> None:
        self.runner, self.meta = runner, {**meta, "image_rules": _rules(meta.get("image_rules"))}
        thresholds = meta["thresholds"]
        # None: the graph's own flag (the model's threshold); fpr | fixed: that threshold
        self.threshold_value = None if threshold is None else float(thresholds[threshold])

    @classmethod
    def load(cls, model: Path, backend: str, threshold: str | None = None,
             threads: int | None = None) -> ExportedDetector:
        """The ``backend`` export ``find_export`` finds for ``model``."""
        if threshold not in (None, "fpr", "fixed"):
            raise ExportError(f"threshold {threshold!r}: expected fpr or fixed")
        runner, meta = load_runner(find_export(model, backend), backend, threads)
        return cls(runner, meta, threshold)

    def score_with_maps(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(score, normalised score, flag, normalised map (B, 1, H, W)) of model input
        ``x`` (B, C, H, W) in [-1, 1]."""
        # x = u / 127.5 - 1 in float32: the round trip gives back u exactly
        images = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        out = self.runner(images.permute(0, 2, 3, 1).contiguous().numpy())  # NHWC
        normed = torch.from_numpy(out["normalised_score"].astype(np.float64))
        flagged = (torch.from_numpy(out["is_anomaly"].astype(bool))
                   if self.threshold_value is None else normed >= self.threshold_value)
        return (torch.from_numpy(out["score"].astype(np.float64)), normed, flagged,
                torch.from_numpy(out["anomaly_map"])[:, None])

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.score_with_maps(x)[:3]
