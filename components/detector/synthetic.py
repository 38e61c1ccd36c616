"""Synthetic anomalies made from normal images only: what the restoration detector is taught.

An anomaly is a *mask* (where) filled with a *texture* (what), blended in with a random
opacity:  x~ = x * (1 - a) + t * a,  a = b * blur_s(m),  m in {0, 1}, b ~ U[opacity],
s ~ U[0, feather] pixels. A soft edge (``feather`` > 0, NSA's argument for seamless
blending) keeps the mask's outline from being the give-away, so the segmentation head must
learn what a defect looks like, not where a paste ends; the label stays the hard mask m.

Masks, of varied shape and size:
- ``perlin``: thresholded Perlin noise at a random lattice resolution (1 ... ``max_cells``
  cells per side, powers of two) and a random target area, so one call gives one large
  blob, a few islands or, with many cells, many specks (DRAEM's generator);
- ``scratch``: a random polyline a few pixels wide (cracks and scratches, which
  blob-shaped masks never teach).

Textures, all made from the batch itself (nothing downloaded, no outside images):
- ``noise``: fractal Perlin noise with a random mean and contrast;
- ``colour``: a flat field of a random grey level / colour with a gentle gradient;
- ``stripes``: a sine grating of random frequency, orientation and phase;
- ``patch``: another normal image of the batch, shifted and flipped (cut-paste / NSA);
- ``shade``: the image's own pixels darkened or brightened (dents, stains, holes).

Every random draw comes from one CPU ``torch.Generator`` and the images are made on the
input's device, so a seed gives the same anomalies on CPU and GPU, for 1 or 3 channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from components.config import SyntheticConfig
from components.detector.map_metrics import gaussian_blur

MASK_KINDS = ("perlin", "scratch")
TEXTURE_KINDS = ("noise", "colour", "stripes", "patch", "shade")


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def perlin_noise(h: int, w: int, res: int, g: torch.Generator, device: torch.device) -> Tensor:
    """2-D Perlin noise (h, w), roughly in [-1, 1], with ``res`` lattice cells per side."""
    angles = 2 * math.pi * torch.rand(res + 1, res + 1, generator=g)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(device)  # (r+1, r+1, 2)
    ys = (torch.arange(h, device=device) + 0.5) * res / h  # lattice coordinates
    xs = (torch.arange(w, device=device) + 0.5) * res / w
    y0, x0 = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]  # (h, 1), (1, w)

    def corner(dy: int, dx: int) -> Tensor:
        gr = grads[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # (h, w, 2)
        return gr[..., 0] * (fx - dx) + gr[..., 1] * (fy - dy)  # dot(gradient, offset)

    def fade(t: Tensor) -> Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), ux)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), ux)
    return torch.lerp(top, bottom, uy) * math.sqrt(2)  # (h, w)


def perlin_mask(h: int, w: int, cfg: SyntheticConfig, g: torch.Generator,
                device: torch.device) -> Tensor:
    """A non-empty {0, 1} mask (h, w): Perlin noise above the quantile giving a random area."""
    res = 2 ** _randint(g, 0, int(math.log2(cfg.max_cells)))  # more cells, more pieces
    noise = perlin_noise(h, w, res, g, device)
    if _uniform(g) < 0.5:
        noise = noise.flip(1)
    area = math.exp(_uniform(g, math.log(cfg.min_area), math.log(cfg.max_area)))
    k = max(1, int(area * h * w))
    threshold = noise.flatten().topk(k).values[-1]
    return (noise >= threshold).float()


def scratch_mask(h: int, w: int, g: torch.Generator, device: torch.device) -> Tensor:
    """A {0, 1} mask (h, w) of a random polyline (2-6 segments), 1-4 % of the side wide."""
    n = _randint(g, 2, 6)
    side = min(h, w)
    step = side * _uniform(g, 0.08, 0.25)
    pts = [torch.tensor([_uniform(g, 0.1, 0.9) * h, _uniform(g, 0.1, 0.9) * w])]
    angle = _uniform(g, 0, 2 * math.pi)
    for _ in range(n):
        angle += _uniform(g, -0.8, 0.8)
        pts.append(pts[-1] + step * torch.tensor([math.sin(angle), math.cos(angle)]))
    p = torch.stack(pts).to(device)  # (n+1, 2)
    yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    q = torch.stack([yy, xx], dim=-1)[None]  # (1, h, w, 2)
    a, b = p[:-1, None, None, :], p[1:, None, None, :]  # (n, 1, 1, 2)
    ab = b - a
    t = (((q - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)  # (n, h, w)
    dist = (q - (a + t[..., None] * ab)).norm(dim=-1).amin(0)  # (h, w)
    width = max(1.0, side * _uniform(g, 0.01, 0.04))
    mask = (dist <= width / 2).float()
    if mask.sum() == 0:  # the polyline left the image: keep its first point
        mask[int(p[0, 0].clamp(0, h - 1)), int(p[0, 1].clamp(0, w - 1))] = 1.0
    return mask


def _texture(kind: str, x: Tensor, other: Tensor, g: torch.Generator) -> Tensor:
    """A texture (C, h, w) in [-1, 1] for one image ``x`` (C, h, w); ``other`` is another
    normal image of the batch (for ``patch``)."""
    c, h, w = x.shape
    device = x.device
    if kind == "noise":
        tex = sum(perlin_noise(h, w, 2 ** o, g, device) / 2 ** (o - 2) for o in
                  range(_randint(g, 1, 3), 6))
        tex = tex / tex.abs().amax().clamp_min(1e-6)
        out = _uniform(g, -0.8, 0.8) + _uniform(g, 0.2, 0.8) * tex
        return out.expand(c, h, w)
    if kind == "colour":
        level = torch.rand(c, 1, 1, generator=g).to(device) * 2 - 1
        if _uniform(g) < 0.5:  # grey-ish field even on colour images
            level = level[:1].expand(c, 1, 1)
        ramp = torch.linspace(-1, 1, w, device=device)[None, None, :] * _uniform(g, -0.3, 0.3)
        return (level + ramp).expand(c, h, w)
    if kind == "stripes":
        theta = _uniform(g, 0, math.pi)
        period = _uniform(g, 3, max(4.0, min(h, w) / 4))
        yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32),
                                indexing="ij")
        wave = torch.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period
                         + _uniform(g, 0, 2 * math.pi))
        out = _uniform(g, -0.5, 0.5) + _uniform(g, 0.3, 0.9) * wave
        return out.expand(c, h, w)
    if kind == "patch":
        shifted = torch.roll(other, shifts=(_randint(g, 0, h - 1), _randint(g, 0, w - 1)),
                             dims=(1, 2))
        if _uniform(g) < 0.5:
            shifted = shifted.flip(2)
        if _uniform(g) < 0.5:
            shifted = shifted.flip(1)
        return shifted
    if kind == "shade":
        gain = _uniform(g, 0.2, 0.7) if _uniform(g) < 0.6 else _uniform(g, 1.3, 2.0)
        return ((x + 1) * gain - 1).clamp(-1, 1)
    raise ValueError(f"unknown texture {kind!r}; expected one of {TEXTURE_KINDS}")


def synthesize_anomalies(x: Tensor, cfg: SyntheticConfig, g: torch.Generator
                         ) -> tuple[Tensor, Tensor]:
    """Corrupt a batch of normal images; returns ``(x_tilde, mask)``.

    ``x`` (B, C, H, W) in [-1, 1] -> ``x_tilde`` (B, C, H, W) in [-1, 1] and ``mask``
    (B, 1, H, W) in {0, 1}: each image is corrupted with probability ``cfg.probability``
    (then its mask is non-empty and inside the image), else returned unchanged with an
    empty mask. Deterministic for the state of ``g``.
    """
    b, c, h, w = x.shape
    out = x.clone()
    masks = torch.zeros(b, 1, h, w, device=x.device)
    for i in range(b):
        if _uniform(g) >= cfg.probability:
            continue
        if _uniform(g) < cfg.scratch_fraction:
            m = scratch_mask(h, w, g, x.device)
        else:
            m = perlin_mask(h, w, cfg, g, x.device)
        kind = cfg.textures[_randint(g, 0, len(cfg.textures) - 1)]
        other = x[(i + _randint(g, 1, max(1, b - 1))) % b] if b > 1 else x[i]
        tex = _texture(kind, x[i], other, g).to(x.dtype)
        alpha = m
        if cfg.feather > 0:  # soft edge; a thin scratch keeps its full strength at its centre
            alpha = gaussian_blur(m[None, None], _uniform(g, 0.0, cfg.feather))[0, 0]
            alpha = alpha / alpha.amax().clamp_min(1e-6)
        alpha = alpha * _uniform(g, cfg.opacity_min, cfg.opacity_max)  # (h, w)
        out[i] = x[i] * (1 - alpha) + tex * alpha
        masks[i, 0] = m
    return out.clamp(-1, 1), masks
