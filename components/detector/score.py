"""Anomaly scores: eval mode, no gradients, independent of batch composition and order.

A(x) = w * R(x) + (1 - w) * L(x), with
  R(x) = mean |x - G(x)|                       (contextual, pixel space)
  L(x) = mean (f(x) - f(G(x)))^2               (latent, the discriminator's features)
L is the per-sample mean squared feature difference, as the Skip-GANomaly reference code
computes it, so R and L have comparable scales whatever the feature size.

Anomaly maps (B, 1, H, W), Gaussian-smoothed: the segmentation head's sigmoid for the
restoration detector, |x - G(x)| (mean over channels) for the paper model and baselines.
The restoration detector's image score is the mean of its map's top ``top_k`` pixels; the
other models keep A.

``AnomalyDetector`` bundles G, D and the normalisation statistics fitted on validation
normals (scores and maps) as registered buffers, so one saved state dict scores single
images correctly.
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

from components.detector.map_metrics import gaussian_blur, top_k_mean
from components.detector.model import GeneratorOutput
from components.runtime import (
    COMPILE_MIN_SCORE_IMAGES,
    Runtime,
    compile_pays_off,
    intra_op_threads,
)


@dataclass(frozen=True)
class MapSettings:
    """How a map is smoothed, and how the restoration detector's image score reads it."""

    sigma: float = 2.0  # Gaussian smoothing, in pixels of the model input
    top_k: float = 0.01  # image score = mean of this fraction of the map's highest pixels


@dataclass
class Scores:
    """Per-image raw scores (float64 numpy arrays of shape (N,)); maps when asked for."""

    score: np.ndarray  # the image score: A, or the map score for nested_restore
    recon: np.ndarray  # R
    latent: np.ndarray  # L
    maps: np.ndarray | None = None  # (N, H, W) float32, smoothed, not normalised


def anomaly_map(out: GeneratorOutput, x: Tensor, sigma: float) -> Tensor:
    """The smoothed anomaly map (B, 1, H, W) of a generator's output for input ``x``."""
    if out.map_logits is not None:
        raw = torch.sigmoid(out.map_logits.float())  # (B, 1, H, W) in [0, 1]
    else:
        raw = (x.float() - out.image.float()).abs().mean(1, keepdim=True)  # (B, 1, H, W)
    return gaussian_blur(raw, sigma)


def score_and_map(
    generator: nn.Module, discriminator: nn.Module, x: Tensor, weight: float,
    settings: MapSettings = MapSettings(),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(score, R, L, map) of one float batch; each row depends only on its own image."""
    out = generator(x)
    recon = out.image  # (B, C, H, W)
    _, feat_real = discriminator(x)  # (B, F, 4, 4)
    _, feat_fake = discriminator(recon)
    r = (x.float() - recon.float()).abs().flatten(1).mean(1)  # (B,)
    lat = (feat_real.float() - feat_fake.float()).pow(2).flatten(1).mean(1)  # (B,)
    amap = anomaly_map(out, x, settings.sigma)  # (B, 1, H, W)
    if out.map_logits is not None:
        score = top_k_mean(amap, settings.top_k)  # (B,)
    else:
        score = weight * r + (1.0 - weight) * lat
    return score, r, lat, amap


def score_batch(
    generator: nn.Module, discriminator: nn.Module, x: Tensor, weight: float,
    settings: MapSettings = MapSettings(),
) -> tuple[Tensor, Tensor, Tensor]:
    """Raw scores of one float batch ``x`` (B, C, H, W); each row depends only on its image."""
    return score_and_map(generator, discriminator, x, weight, settings)[:3]


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
def _compiled_score_and_map() -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    # One compiled function for every model: the modules are arguments and their weights
    # graph inputs, so new weights (the next epoch's) reuse the compiled code.
    return torch.compile(score_and_map, dynamic=False)


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


MAX_BATCH_PIXELS = 256 * 128 * 128  # ~7 GB of activations for nested_restore (measured)


def images_per_batch(batch_size: int, n: int, pixels: int) -> int:
    """At most ``batch_size`` images and ``MAX_BATCH_PIXELS`` pixels per scoring batch (at
    least one image): ``evaluate.batch_size`` 256 is 256 images up to 128 px, 64 at 256 px,
    so memory stays that of 128 px whatever the resolution. Scores do not depend on it."""
    return max(1, min(batch_size, n, MAX_BATCH_PIXELS // max(pixels, 1)))


def score_images(
    generator: nn.Module,
    discriminator: nn.Module,
    images: Tensor,
    weight: float,
    runtime: Runtime,
    batch_size: int = 256,
    settings: MapSettings = MapSettings(),
    with_maps: bool = False,
) -> Scores:
    """Score uint8 images (N, C, H, W) in eval mode, in batches; ``with_maps`` also returns
    the smoothed maps (N, H, W).

    Runs on eval-mode copies (BN folded, or compiled when ``runtime.compile`` pays off for
    N images), so the modules passed in, their mode and BN statistics are untouched. Each
    score depends only on its image, to float rounding, whatever the batch size or order.
    """
    if len(images) == 0:
        empty = np.zeros(0)
        maps = np.zeros((0, *images.shape[2:]), np.float32) if with_maps else None
        return Scores(empty, empty.copy(), empty.copy(), maps)
    compiled = compile_pays_off(
        runtime.compile, runtime.device.type, len(images), COMPILE_MIN_SCORE_IMAGES
    )
    batch_size = images_per_batch(batch_size, len(images), images.shape[-2] * images.shape[-1])
    g, d = _scoring_networks(generator, discriminator, runtime, compiled)
    run = _compiled_score_and_map() if compiled else score_and_map
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    map_parts: list[Tensor] = []
    with torch.inference_mode(), intra_op_threads(runtime.threads):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            n = len(chunk)
            if compiled and n < batch_size:  # pad the ragged batch: one shape, one compile
                chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
            x = runtime.prepare(chunk)
            with runtime.autocast():
                *three, amap = run(g, d, x, weight, settings)
            out.append(tuple(t[:n] for t in three))
            if with_maps:
                map_parts.append(amap[:n, 0].float())
        # one device-to-host copy at the end: no synchronisation per batch on CUDA
        a, r, lat = (torch.cat(parts).cpu().double().numpy() for parts in zip(*out, strict=True))
        maps = torch.cat(map_parts).cpu().numpy() if with_maps else None
    return Scores(a, r, lat, maps)


class AnomalyDetector(nn.Module):
    """G and D plus the normalisation statistics and threshold fitted on validation normals.

    forward(x) -> (score, normalised score in [0, 1], is_anomaly), each (B,).
    maps(x) -> the anomaly map (B, 1, H, W) normalised with the validation normals' map
    statistics (``map_low`` -> 0, ``map_high`` -> 1, clipped), so a normal image stays cool.
    """

    MAP_BUFFERS = ("map_low", "map_high")

    def __init__(self, generator: nn.Module, discriminator: nn.Module, weight: float,
                 settings: MapSettings = MapSettings()) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.weight = weight
        self.settings = settings
        self.register_buffer("score_min", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("score_max", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))
        self.register_buffer("map_low", torch.tensor(0.0))
        self.register_buffer("map_high", torch.tensor(1.0))

    def set_map_statistics(self, low: float, high: float) -> None:
        self.map_low.fill_(low)
        self.map_high.fill_(high)

    def set_statistics(self, score_min: float, score_max: float, threshold: float) -> None:
        self.score_min.fill_(score_min)
        self.score_max.fill_(score_max)
        self.threshold.fill_(threshold)

    def normalise(self, scores: Tensor) -> Tensor:
        span = (self.score_max - self.score_min).clamp_min(1e-12)
        return ((scores.double() - self.score_min) / span).clamp(0.0, 1.0)

    def normalise_map(self, amap: Tensor) -> Tensor:
        span = (self.map_high - self.map_low).clamp_min(1e-12)
        return ((amap.float() - self.map_low) / span).clamp(0.0, 1.0)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, _, _ = score_batch(self.generator, self.discriminator, x, self.weight, self.settings)
        a = a.double()
        norm = self.normalise(a)
        return a, norm, norm >= self.threshold

    @torch.no_grad()
    def score_with_maps(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """forward's three outputs plus the normalised map (B, 1, H, W) in [0, 1]."""
        a, _, _, amap = score_and_map(self.generator, self.discriminator, x, self.weight,
                                      self.settings)
        a = a.double()
        norm = self.normalise(a)
        return a, norm, norm >= self.threshold, self.normalise_map(amap)
