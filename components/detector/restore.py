"""The restoration detector (``model.name: nested_restore``): the paper's nested generator
taught to *repair* synthetic anomalies, plus a segmentation head that says where they are.

Read top-down, as DRAEM's Figure 3 built from the paper's own blocks:

    x~  (B, C, H, W)  a normal image, sometimes with a synthetic anomaly (``synthetic``)
    G(x~) (B, C, H, W)  the nested generator (``model.NestedGenerator``) restores x
    S([x~, G(x~)]) (B, 1, H, W)  a small nested UNet++ (the paper's decoder idea) predicts
                                 the anomaly mask as logits

At test time a defect is repaired, not copied, so [x, G(x)] differ where it lies, and
``sigmoid(S)`` is the anomaly map. The paper's discriminator still judges G(x~) against real
normals (adversarial and latent losses), so the paper's losses and score stay defined.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.detector.model import GeneratorOutput, NestedDecoder, NestedEncoder, NestedGenerator


class SegmentationHead(nn.Module):
    """Nested UNet++ (shared encoder + nested decoder) -> one logit per pixel."""

    def __init__(self, in_channels: int, base_width: int, depth: int) -> None:
        super().__init__()
        self.encoder = NestedEncoder(in_channels, base_width, depth)
        self.decoder = NestedDecoder(base_width, depth)
        self.head = nn.Conv2d(base_width, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        top = self.decoder(self.encoder(x))  # (B, base_width, H, W)
        return self.head(top)  # (B, 1, H, W) logits


class NestedRestoreGenerator(nn.Module):
    """G (restores) and S (segments), one module: ``forward`` returns a ``GeneratorOutput``
    whose ``image`` is G(x) and ``map_logits`` is S([x, G(x)]).

    The restoration is detached before S by default: S learns to compare, G learns to
    restore, and neither's loss pulls the other's weights (``detach_restoration``).
    """

    def __init__(self, channels: int, base_width: int, depth: int, seg_width: int,
                 seg_depth: int, detach_restoration: bool = True) -> None:
        super().__init__()
        self.restorer = NestedGenerator(channels, base_width, depth)
        self.segmenter = SegmentationHead(2 * channels, seg_width, seg_depth)
        self.detach_restoration = detach_restoration

    def forward(self, x: Tensor) -> GeneratorOutput:
        restored = self.restorer(x).image  # (B, C, H, W) in [-1, 1]
        pair = restored.detach() if self.detach_restoration else restored
        logits = self.segmenter(torch.cat([x, pair], dim=1))  # (B, 1, H, W)
        return GeneratorOutput(restored, map_logits=logits)
