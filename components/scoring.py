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

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from components.data import to_model_input


@dataclass(frozen=True)
class Runtime:
    """Where and how to run a network."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    channels_last: bool

    def autocast(self):  # noqa: ANN201 - a context manager
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float [-1, 1] on the device, in the chosen memory format."""
        x = to_model_input(images.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX-512 bf16 units (where bf16 autocast pays off)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_runtime(device: str = "auto", precision: str = "auto",
                    channels_last: bool = True) -> Runtime:
    """CUDA when present (or asked for), else CPU; bf16 autocast where the hardware has it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from components.errors import ConfigError

        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    dev = torch.device(device)
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
        precision = "bf16" if fast else "fp32"
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else None, channels_last)


@dataclass
class Scores:
    """Per-image raw scores (float64 numpy arrays of shape (N,))."""

    score: np.ndarray  # A
    recon: np.ndarray  # R
    latent: np.ndarray  # L


def score_batch(generator: nn.Module, discriminator: nn.Module, x: Tensor,
                weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Raw scores of one float batch ``x`` (B, C, H, W); each row depends only on its image."""
    recon = generator(x).image  # (B, C, H, W)
    _, feat_real = discriminator(x)  # (B, F, 4, 4)
    _, feat_fake = discriminator(recon)
    r = (x.float() - recon.float()).abs().flatten(1).mean(1)  # (B,)
    lat = (feat_real.float() - feat_fake.float()).pow(2).flatten(1).mean(1)  # (B,)
    return weight * r + (1.0 - weight) * lat, r, lat


@torch.no_grad()
def score_images(generator: nn.Module, discriminator: nn.Module, images: Tensor,
                 weight: float, runtime: Runtime, batch_size: int = 256) -> Scores:
    """Score uint8 images (N, C, H, W) in eval mode, in batches; restores the modules' mode."""
    modes = generator.training, discriminator.training
    generator.eval()
    discriminator.eval()
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    try:
        for start in range(0, len(images), batch_size):
            x = runtime.prepare(images[start : start + batch_size])
            with runtime.autocast():
                out.append(tuple(t.cpu() for t in score_batch(generator, discriminator, x,
                                                               weight)))
    finally:
        generator.train(modes[0])
        discriminator.train(modes[1])
    if not out:
        empty = np.zeros(0)
        return Scores(empty, empty.copy(), empty.copy())
    a, r, lat = (torch.cat(parts).double().numpy() for parts in zip(*out, strict=True))
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
