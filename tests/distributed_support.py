"""Helpers for tests/detector/test_distributed.py.

Run as a script under torchrun, ``python -m torch.distributed.run --standalone
--nproc-per-node 2 tests/distributed_support.py OUT.pt``, it makes two ``GanTrainer`` steps
under DistributedDataParallel, each rank on its share of one fixed batch, and rank 0 saves
the weights and losses to OUT.pt; :func:`two_steps` with ``dist=None`` is the same on the
whole batch in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from components.config import parse_params
from components.data.images import to_model_input
from components.detector.distributed import (
    DistContext,
    close_distributed,
    context_from_env,
    init_distributed,
    shard,
)
from components.detector.networks import build_networks
from components.detector.train import GanTrainer
from components.runtime import Runtime

STEP_BATCH = 8
STEP_PARAMS = {"model": {"base_width": 4, "disc_width": 8},
               "train": {"batch_size": STEP_BATCH, "lr": 1e-3, "device": "cpu",
                         "precision": "fp32", "channels_last": False}}


def step_batch() -> torch.Tensor:
    """A fixed float batch (8, 3, 16, 16) in [-1, 1]."""
    g = torch.Generator().manual_seed(7)
    return to_model_input(torch.randint(0, 256, (STEP_BATCH, 3, 16, 16), dtype=torch.uint8,
                                        generator=g))


def two_steps(dist: DistContext | None) -> dict[str, object]:
    """Two G-then-D steps from seed 0 with every BatchNorm in eval mode (fixed statistics,
    so each image's outputs depend on that image only); this rank's share of the batch."""
    params = parse_params(STEP_PARAMS, origin="distributed_support")
    torch.manual_seed(0)
    g, d = build_networks(params.model, 3, 16)
    for net in (g, d):
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    trainer = GanTrainer(g, d, params.train, Runtime(torch.device("cpu"), None, False),
                         compile=False, dist=dist)
    x = step_batch()
    x = x[shard(torch.arange(len(x)), dist)]
    losses = [trainer.step(x) for _ in range(2)]
    return {"generator": {k: v.clone() for k, v in g.state_dict().items()},
            "discriminator": {k: v.clone() for k, v in d.state_dict().items()},
            "losses": [{k: float(v) for k, v in step.items()} for step in losses]}


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = context_from_env()
    init_distributed(ctx, "cpu", 120)
    try:
        result = two_steps(ctx)
    finally:
        close_distributed()
    if ctx.is_main:
        torch.save(result, Path(out))


if __name__ == "__main__":
    main(sys.argv[1])
