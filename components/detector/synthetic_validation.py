"""Choosing without labelled anomalies: validation normals plus synthetic anomalies made
from them, with a fixed seed of their own (never the training corruptions' stream).

The synthetic validation AUROC (image and pixel) chooses the restoration detector's kept
checkpoint and is reported beside the test figures, labelled as synthetic; the test split
chooses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from components.config import SyntheticConfig
from components.data.images import to_model_input
from components.detector.map_metrics import pixel_auroc
from components.detector.synthetic import synthesize_anomalies


@dataclass
class SyntheticValidationSet:
    """2N uint8 images: the N validation normals, then one synthetic anomaly of each."""

    images: torch.Tensor  # (2N, C, H, W) uint8
    is_anomaly: np.ndarray  # (2N,) 0/1
    masks: np.ndarray  # (2N, H, W) uint8 {0, 1}


def make_synthetic_validation(val_images: torch.Tensor, cfg: SyntheticConfig
                              ) -> SyntheticValidationSet:
    """Corrupt every validation normal once, deterministically (``cfg.val_seed``)."""
    every = cfg.model_copy(update={"probability": 1.0})
    g = torch.Generator().manual_seed(cfg.val_seed)
    x_tilde, mask = synthesize_anomalies(to_model_input(val_images), every, g)
    corrupted = ((x_tilde + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    n = len(val_images)
    masks = torch.cat([torch.zeros_like(mask), mask])[:, 0].to(torch.uint8).numpy()
    return SyntheticValidationSet(torch.cat([val_images, corrupted]),
                                  np.r_[np.zeros(n, int), np.ones(n, int)], masks)


@dataclass
class SyntheticValidationReport:
    image_auroc: float
    pixel_auroc: float

    @property
    def criterion(self) -> float:
        """What the checkpoint choice maximises: the mean of the two AUROCs."""
        return 0.5 * (self.image_auroc + self.pixel_auroc)


def synthetic_validation_report(scores: np.ndarray, maps: np.ndarray,
                                data: SyntheticValidationSet) -> SyntheticValidationReport:
    """Image AUROC of the scores and pixel AUROC of the maps on a synthetic validation set."""
    return SyntheticValidationReport(float(roc_auc_score(data.is_anomaly, scores)),
                                     pixel_auroc(maps, data.masks))
