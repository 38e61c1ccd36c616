"""Anomaly scores: eval mode, no gradients, independent of batch composition and order.

A(x) = w * R(x) + (1 - w) * L(x), with
  R(x) = mean |x - G(x)|                       (contextual, pixel space)
  L(x) = mean (f(x) - f(G(x)))^2               (latent, the discriminator's features)
L is the per-sample mean squared feature difference, as the Skip-GANomaly reference code
computes it, so R and L have comparable scales whatever the feature size.

``AnomalyDetector`` bundles G, D and the normalisation statistics fitted on validation
normals as registered buffers, so one saved state dict scores single images correctly.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse as fuse_conv_bn
from torch.fx.proxy import TraceError

from components.runtime import (
    COMPILE_MIN_SCORE_IMAGES,
    Runtime,
    compile_pays_off,
    intra_op_threads,
)


@dataclass
class Scores:
    """Per-image raw scores (float64 numpy arrays of shape (N,))."""

    score: np.ndarray  # A
    recon: np.ndarray  # R
    latent: np.ndarray  # L


def score_batch(
    generator: nn.Module, discriminator: nn.Module, x: Tensor, weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Raw scores of one float batch ``x`` (B, C, H, W); each row depends only on its image."""
    recon = generator(x).image  # (B, C, H, W)
    _, feat_real = discriminator(x)  # (B, F, 4, 4)
    _, feat_fake = discriminator(recon)
    r = (x.float() - recon.float()).abs().flatten(1).mean(1)  # (B,)
    lat = (feat_real.float() - feat_fake.float()).pow(2).flatten(1).mean(1)  # (B,)
    return weight * r + (1.0 - weight) * lat, r, lat


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with every BatchNorm that follows a convolution
    folded into that convolution's weight and bias.

    The copy computes the function of ``module.eval()`` up to float rounding (~1e-7
    relative in fp32) with one pass over memory less per folded layer. A module torch.fx
    cannot trace is copied unfolded. ``module`` itself is left as it was.
    """
    was_training = module.training
    module.eval()
    try:
        return fuse_conv_bn(module)  # traces and folds a deep copy
    except TraceError:
        return copy.deepcopy(module)
    finally:
        module.train(was_training)


@functools.cache
def _compiled_score_batch() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    # One compiled function for every model: the modules are arguments and their weights
    # graph inputs, so new weights (the next epoch's) reuse the compiled code.
    return torch.compile(score_batch, dynamic=False)


def _scoring_networks(
    generator: nn.Module, discriminator: nn.Module, runtime: Runtime, compiled: bool
) -> tuple[nn.Module, nn.Module]:
    """Eval-mode copies of G and D for scoring only, in the runtime's memory format.

    Eager copies have BN folded into the convolutions. Compiled ones keep their classes
    (a folded copy is a new fx class each time, which would recompile) and leave the
    fusion of BN to inductor.
    """
    if compiled:
        nets = (copy.deepcopy(generator).eval(), copy.deepcopy(discriminator).eval())
    else:
        nets = (fold_batchnorm(generator), fold_batchnorm(discriminator))
    return tuple(n.to(runtime.device, memory_format=runtime.memory_format) for n in nets)


def score_images(
    generator: nn.Module,
    discriminator: nn.Module,
    images: Tensor,
    weight: float,
    runtime: Runtime,
    batch_size: int = 256,
) -> Scores:
    """Score uint8 images (N, C, H, W) in eval mode, in batches.

    Runs on eval-mode copies (BN folded, or compiled when ``runtime.compile`` pays off for
    N images), so the modules passed in, their mode and BN statistics are untouched. Each
    score depends only on its image, to float rounding, whatever the batch size or order.
    """
    if len(images) == 0:
        empty = np.zeros(0)
        return Scores(empty, empty.copy(), empty.copy())
    compiled = compile_pays_off(
        runtime.compile, runtime.device.type, len(images), COMPILE_MIN_SCORE_IMAGES
    )
    batch_size = min(batch_size, len(images))
    g, d = _scoring_networks(generator, discriminator, runtime, compiled)
    run = _compiled_score_batch() if compiled else score_batch
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    with torch.inference_mode(), intra_op_threads(runtime.threads):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            n = len(chunk)
            if compiled and n < batch_size:  # pad the ragged batch: one shape, one compile
                chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
            x = runtime.prepare(chunk)
            with runtime.autocast():
                out.append(tuple(t[:n] for t in run(g, d, x, weight)))
        # one device-to-host copy at the end: no synchronisation per batch on CUDA
        a, r, lat = (torch.cat(parts).cpu().double().numpy() for parts in zip(*out, strict=True))
    return Scores(a, r, lat)


class AnomalyDetector(nn.Module):
    """G and D plus the normalisation statistics and threshold fitted on validation normals.

    forward(x) -> (score, normalised score in [0, 1], is_anomaly), each (B,).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, weight: float) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.weight = weight
        self.register_buffer("score_min", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("score_max", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))

    def set_statistics(self, score_min: float, score_max: float, threshold: float) -> None:
        self.score_min.fill_(score_min)
        self.score_max.fill_(score_max)
        self.threshold.fill_(threshold)

    def normalise(self, scores: Tensor) -> Tensor:
        span = (self.score_max - self.score_min).clamp_min(1e-12)
        return ((scores.double() - self.score_min) / span).clamp(0.0, 1.0)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, _, _ = score_batch(self.generator, self.discriminator, x, self.weight)
        a = a.double()
        norm = self.normalise(a)
        return a, norm, norm >= self.threshold
