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
from components.detector.map_metrics import gaussian_blur, pixel_auroc, top_k_mean
from components.detector.score import MapSettings
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


SIGMAS = (0.0, 1.0, 2.0, 4.0)
TOP_KS = (0.001, 0.01, 0.05)


@dataclass
class MapChoice:
    """The map settings chosen on the synthetic validation set, the chosen candidate's
    figures and the table of every candidate tried (it goes into metrics.json)."""

    settings: MapSettings
    report: SyntheticValidationReport
    candidates: list[dict[str, float]]


def choose_map_settings(raw_maps: np.ndarray, data: SyntheticValidationSet,
                        sigma: float | str, top_k: float | str) -> MapChoice:
    """The smoothing and top share that maximise the synthetic validation criterion (mean
    of image and pixel AUROC), over ``SIGMAS`` x ``TOP_KS`` where a value is ``"auto"``.

    ``raw_maps`` (2N, H, W) are the unsmoothed maps of ``data``.
    """
    maps = torch.from_numpy(np.asarray(raw_maps, np.float32))[:, None]  # (2N, 1, H, W)
    sigmas = SIGMAS if sigma == "auto" else (float(sigma),)
    top_ks = TOP_KS if top_k == "auto" else (float(top_k),)
    table = []
    for s in sigmas:
        smooth = gaussian_blur(maps, s)
        pixel = pixel_auroc(smooth[:, 0].numpy(), data.masks)
        for k in top_ks:
            image = float(roc_auc_score(data.is_anomaly, top_k_mean(smooth, k).numpy()))
            table.append({"sigma": s, "top_k": k, "image_auroc": image, "pixel_auroc": pixel,
                          "criterion": 0.5 * (image + pixel)})
    best = max(table, key=lambda row: row["criterion"])  # first of equals: the smaller values
    return MapChoice(MapSettings(sigma=best["sigma"], top_k=best["top_k"]),
                     SyntheticValidationReport(best["image_auroc"], best["pixel_auroc"]), table)


def synthetic_validation_report(scores: np.ndarray, maps: np.ndarray,
                                data: SyntheticValidationSet) -> SyntheticValidationReport:
    """Image AUROC of the scores and pixel AUROC of the maps on a synthetic validation set."""
    return SyntheticValidationReport(float(roc_auc_score(data.is_anomaly, scores)),
                                     pixel_auroc(maps, data.masks))
