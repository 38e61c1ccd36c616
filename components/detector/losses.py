"""Losses of the restoration detector, beside the paper's (which live in ``train``).

- ``ssim``: the structural similarity of a restoration to its target (a structural term
  the smooth-L1 contextual loss lacks: it keeps edges and texture, not just mean levels);
- ``focal_loss`` + ``dice_loss``: the segmentation head against the synthetic mask; focal
  because anomalous pixels are a few percent of all pixels, Dice because it scores the
  region as a whole whatever its size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ssim(x: Tensor, y: Tensor, window: int = 7) -> Tensor:
    """Mean SSIM of two float batches (B, C, H, W) in [-1, 1] (uniform window)."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # dynamic range 2

    def pool(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, window, 1, window // 2, count_include_pad=False)

    mu_x, mu_y = pool(x), pool(y)
    var_x = pool(x * x) - mu_x**2
    var_y = pool(y * y) - mu_y**2
    cov = pool(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean()


def focal_loss(logits: Tensor, mask: Tensor, gamma: float = 2.0) -> Tensor:
    """Binary focal loss (Lin et al. 2017) of logits (B, 1, H, W) against a {0, 1} mask."""
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    p = torch.sigmoid(logits)
    p_true = p * mask + (1 - p) * (1 - mask)
    return ((1 - p_true) ** gamma * bce).mean()


def dice_loss(logits: Tensor, mask: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice per image, averaged; an empty mask with an empty prediction costs 0."""
    p = torch.sigmoid(logits)
    inter = (p * mask).sum(dim=(1, 2, 3))
    total = p.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3))
    return (1 - (2 * inter + smooth) / (total + smooth)).mean()
