"""The exported function: uint8 images in, raw score, normalised score, flag and
normalised anomaly map out; the normalisation statistics and threshold are its buffers.

Input ``image``: uint8 ``(N, H, W, C)``, channels last, as image libraries decode them
(PIL, OpenCV, numpy), at the model's ``image_size`` and channel count; the batch size is
free. The graph scales to [-1, 1] itself, exactly as ``to_model_input`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.detector.score import AnomalyDetector

INPUT_NAME = "image"
# score: raw A (or the map score), float32 (N,); normalised_score: in [0, 1], float32 (N,);
# is_anomaly: normalised_score >= the model's threshold, bool (N,);
# anomaly_map: normalised with the validation normals' map statistics, float32 (N, H, W).
OUTPUT_NAMES = ("score", "normalised_score", "is_anomaly", "anomaly_map")


class ExportGraph(nn.Module):
    """``AnomalyDetector.score_with_maps`` behind a uint8 channels-last input."""

    def __init__(self, detector: AnomalyDetector) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = image.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W) in [-1, 1]
        score, normed, flagged, amap = self.detector.score_with_maps(x)
        return score.float(), normed.float(), flagged, amap[:, 0].float()  # amap (N, H, W)


def sample_input(image_size: int, channels: int, batch: int = 2) -> Tensor:
    """A seeded uint8 ``(batch, H, W, C)`` tensor to trace the graph with."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, image_size, image_size, channels), dtype=torch.uint8,
                         generator=gen)
