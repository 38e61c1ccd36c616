"""Label-preserving augmentation of normal training images, and training crops.

Every transform is off unless ``train.augment`` turns it on: whether a flipped, rotated or
shifted part is still a normal part depends on the part (a texture: yes; a connector
with a keyed side: no). All draws come from one CPU ``torch.Generator``, per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from components.config import AugmentConfig


def _coin(g: torch.Generator, n: int) -> Tensor:
    return torch.rand(n, generator=g) < 0.5  # (n,) bool


def augment_batch(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    """Augment a float batch (B, C, H, W) in [-1, 1]; returns a new tensor, same shape."""
    b, _, h, w = x.shape
    out = x.clone()
    if cfg.hflip:
        flip = _coin(g, b).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if cfg.vflip:
        flip = _coin(g, b).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(2), out)
    if cfg.rot90 and h == w:
        turns = torch.randint(0, 4, (b,), generator=g)
        out = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(out, turns,
                                                                                   strict=True)])
    if cfg.shift > 0:
        pad_h, pad_w = max(1, int(cfg.shift * h)), max(1, int(cfg.shift * w))
        padded = F.pad(out, (pad_w, pad_w, pad_h, pad_h), mode="reflect")  # no wrap-around
        dy = torch.randint(0, 2 * pad_h + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * pad_w + 1, (b,), generator=g)
        out = torch.stack([padded[i, :, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
                           for i in range(b)])
    if cfg.contrast > 0:
        factor = 1 + (torch.rand(b, generator=g) * 2 - 1) * cfg.contrast
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * factor.to(x.device)[:, None, None, None] + mean
    if cfg.brightness > 0:
        delta = (torch.rand(b, generator=g) * 2 - 1) * cfg.brightness
        out = out + delta.to(x.device)[:, None, None, None]
    return out.clamp(-1, 1)


def crop_offsets(side: int, size: int, count: int, g: torch.Generator) -> Tensor:
    """``count`` crop offsets in [0, side - size] that reach the border as often as the centre
    within a factor of 2.

    A uniform offset covers pixel 0 in 1 crop of ``side - size + 1`` and the centre in every
    one, so a model trained on crops hardly sees the border it is scored on. Drawing the
    offset from [-(size - 1), side - 1] and clamping it covers every pixel with probability
    between size / (side + size - 1) and twice that (results/experiments/crop_borders.md).
    """
    raw = torch.randint(-(size - 1), side, (count,), generator=g)
    return raw.clamp(0, side - size)


def random_crop(x: Tensor, size: int, g: torch.Generator) -> Tensor:
    """One random ``size`` x ``size`` crop per image of (B, C, H, W), border-covering offsets
    (``crop_offsets``); the input if it fits."""
    b, _, h, w = x.shape
    if size >= h and size >= w:
        return x
    size_h, size_w = min(size, h), min(size, w)
    top = crop_offsets(h, size_h, b, g)
    left = crop_offsets(w, size_w, b, g)
    return torch.stack([x[i, :, int(top[i]):int(top[i]) + size_h,
                          int(left[i]):int(left[i]) + size_w] for i in range(b)])
