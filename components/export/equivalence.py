"""The equivalence check: an exported graph against the PyTorch path on the same images.

Three figures, each a max absolute difference that must stay within the backend's
tolerance (``TOLERANCE``):

- ``score``: raw scores divided by the normalisation span (score_max - score_min), i.e.
  the unclipped normalised score, so a difference clipping would hide still counts;
- ``normalised_score``: the clipped normalised score in [0, 1];
- ``anomaly_map``: the normalised map in [0, 1], every pixel.

Flags must agree on every image whose normalised score lies farther than the tolerance
from the threshold (one within it may round either way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from components.data.images import to_model_input
from components.detector.score import AnomalyDetector
from components.export.graph import OUTPUT_NAMES
from components.export.metadata import ExportError

# onnxruntime (fp32) and OpenVINO (fp32 weights, f32 precision hint) matched to ~2e-7 here
# (AVX2 CPU, tiny models): the tolerance leaves two to three orders of magnitude of headroom.
TOLERANCE = {"onnx": 1e-4, "openvino": 1e-4}

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class EquivalenceReport:
    """How an export compared with the PyTorch path."""

    backend: str
    images: int
    images_from: str
    tolerance: float
    max_abs: dict[str, float]
    flag_mismatches: int
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def failure(self) -> str:
        worst = ", ".join(f"{k} {v:.3g}" for k, v in self.max_abs.items())
        return (f"{self.backend} export disagrees with PyTorch on {self.images} images "
                f"({self.images_from}): max abs difference {worst} (tolerance "
                f"{self.tolerance:g}), {self.flag_mismatches} flags differ")


@torch.no_grad()
def reference_outputs(detector: AnomalyDetector, images: torch.Tensor,
                      batch_size: int = 64) -> dict[str, np.ndarray]:
    """The PyTorch path's four outputs for uint8 ``(N, C, H, W)`` images."""
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size])
        a, norm, flag, amap = detector.eval().score_with_maps(x)
        parts.append((a, norm, flag, amap[:, 0]))  # amap (B, H, W)
    return {name: torch.cat(cols).numpy() for name, cols in
            zip(OUTPUT_NAMES, zip(*parts, strict=True), strict=True)}


def run_batched(runner: Runner, images: torch.Tensor, batch_size: int = 64
                ) -> dict[str, np.ndarray]:
    """An exported graph's outputs for uint8 ``(N, C, H, W)`` images (fed as NHWC)."""
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    parts = [runner(nhwc[start : start + batch_size])
             for start in range(0, len(nhwc), batch_size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_NAMES}


def compare_outputs(reference: dict[str, np.ndarray], exported: dict[str, np.ndarray],
                    span: float, threshold: float, tolerance: float, backend: str,
                    images_from: str) -> EquivalenceReport:
    """The report of ``exported`` against ``reference`` (both keyed by output name)."""
    diff = {
        "score": float(np.max(np.abs(exported["score"].astype(np.float64)
                                     - reference["score"].astype(np.float64)))) / span,
        "normalised_score": float(np.max(np.abs(
            exported["normalised_score"].astype(np.float64)
            - reference["normalised_score"].astype(np.float64)))),
        "anomaly_map": float(np.max(np.abs(exported["anomaly_map"].astype(np.float64)
                                           - reference["anomaly_map"].astype(np.float64)))),
    }
    clear = np.abs(reference["normalised_score"].astype(np.float64) - threshold) > tolerance
    mismatches = int(np.sum((exported["is_anomaly"].astype(bool)
                             != reference["is_anomaly"].astype(bool)) & clear))
    finite = all(np.isfinite(exported[n]).all() for n in OUTPUT_NAMES)
    passed = finite and mismatches == 0 and all(v <= tolerance for v in diff.values())
    return EquivalenceReport(backend, len(reference["score"]), images_from, tolerance, diff,
                             mismatches, bool(passed))


def check_equivalence(detector: AnomalyDetector, runner: Runner, images: torch.Tensor,
                      backend: str, images_from: str, tolerance: float | None = None
                      ) -> EquivalenceReport:
    """Compare ``runner`` with the detector on uint8 ``(N, C, H, W)`` images; the report
    (``passed`` False when any figure is past the tolerance)."""
    if len(images) == 0:
        raise ExportError(f"equivalence check: no images ({images_from})")
    tol = TOLERANCE[backend] if tolerance is None else tolerance
    span = max(float(detector.score_max - detector.score_min), 1e-12)
    reference = reference_outputs(detector, images)
    exported = run_batched(runner, images)
    return compare_outputs(reference, exported, span, float(detector.threshold), tol, backend,
                           images_from)


def synthetic_check_images(image_size: int, channels: int, count: int = 32,
                           seed: int = 0) -> torch.Tensor:
    """Seeded smooth uint8 images ``(count, C, H, W)``: random 4x4 fields upsampled
    bilinearly plus a little noise, for when no validation image is at hand."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((count, channels, 4, 4), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(image_size, image_size),
                                             mode="bilinear", align_corners=False)
    noisy = smooth + 0.03 * torch.randn(smooth.shape, generator=gen)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
