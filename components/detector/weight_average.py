"""Exponential moving average of the generator's weights (Polyak averaging), the network
that is validated, kept and scored when ``train.ema`` is set.

GAN weights wander from step to step: in one 2500-step run the synthetic-validation image
AUROC moved by up to 0.06 between neighbouring validations, 250 steps apart
(results/experiments/ema.md), so the kept checkpoint was partly a draw. The average over
the last ~1 / (1 - decay) steps is a smoother network for about 1 % of a step's time (one
copy of G, one fused update per step):

    ema <- d * ema + (1 - d) * w,   d = min(decay, (1 + t) / (10 + t))   at update t

(the warm-up keeps the average from being dominated by the random initial weights in
short runs). Buffers (BN running statistics) are copied as they are; the trainer recomputes
the average's BN statistics before every validation of ``nested_restore``
(``precise_bn``), as it did for the raw weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """An averaged copy of ``net``; ``update(net)`` after every optimiser step."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} must lie in (0, 1)")
        self.decay = decay
        self.updates = 0
        self.net = copy.deepcopy(net).requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        torch._foreach_lerp_(list(self.net.parameters()),
                             [p.detach() for p in net.parameters()], 1.0 - d)
        buffers = list(self.net.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(net.buffers()))

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.updates = int(state["updates"])
