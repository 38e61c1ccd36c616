"""G's optimiser parameter groups: the paper's single group, or the restoration detector's
segmentation head apart with its own Adam beta1 (``train.seg_beta1``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from components.config import TrainConfig


def generator_param_groups(generator: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """G's optimiser groups: one (the paper), or, with ``seg_beta1`` set, the restoration
    detector's segmentation head apart with its own beta1. beta1 0.5 is the DCGAN recipe for
    adversarial stability; the head is trained by a supervised loss only (its input is
    detached from the restorer), for which Adam's standard momentum (0.9) is the usual
    choice."""
    segmenter = getattr(generator, "segmenter", None)
    if cfg.seg_beta1 is None or segmenter is None:
        return [{"params": list(generator.parameters())}]
    head = list(segmenter.parameters())
    ids = {id(p) for p in head}
    rest = [p for p in generator.parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": head, "betas": (cfg.seg_beta1, cfg.beta2)}]
