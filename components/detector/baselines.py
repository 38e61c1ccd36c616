"""The paper's baseline generators: GANomaly (Akcay 2018) and Skip-GANomaly (Akcay 2019).

Same conventions as :mod:`components.detector.model`: plain ``nn.Module``s returning
:class:`~components.detector.model.GeneratorOutput`, images in [-1, 1], built and DCGAN-initialised
by :func:`~components.detector.networks.build_generator`. Both are trained against the DCGAN
:class:`~components.detector.model.Discriminator`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.detector.model import GeneratorOutput, dcgan_pyramid

# ---------------------------------------------------------------------------------------
# GANomaly: encoder E1 -> decoder -> encoder E2, compared in latent space.


class DcganEncoder(nn.Module):
    """DCGAN conv stack down to a bottleneck code (B, latent_dim, 1, 1).

    The last conv's kernel covers the whole remaining map (4x4 for powers of two), so the
    code summarises the full image.
    """

    def __init__(self, channels: int, image_size: int, width: int, latent_dim: int) -> None:
        super().__init__()
        pyramid, out_width, out_size = dcgan_pyramid(channels, image_size, width)
        self.main = nn.Sequential(
            pyramid, nn.Conv2d(out_width, latent_dim, out_size, 1, 0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (B, latent_dim, 1, 1)


class DcganDecoder(nn.Module):
    """Mirror of :class:`DcganEncoder`: transposed convs from the code back to an image.

    ConvT(kernel = the encoder's last map size) + BN + ReLU, then ConvT4x4 s2 + BN + ReLU
    halving the width, then ConvT4x4 s2 + tanh to ``channels``.
    """

    def __init__(self, channels: int, image_size: int, width: int, latent_dim: int) -> None:
        super().__init__()
        # Same geometry as the encoder, so the decoder lands exactly on image_size.
        _, out_width, out_size = dcgan_pyramid(channels, image_size, width)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, out_width, out_size, 1, 0, bias=False),
            nn.BatchNorm2d(out_width),
            nn.ReLU(inplace=True),
        ]
        w, size = out_width, out_size
        while size < image_size // 2:
            layers += [
                nn.ConvTranspose2d(w, w // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w // 2),
                nn.ReLU(inplace=True),
            ]
            w, size = w // 2, size * 2
        layers += [nn.ConvTranspose2d(w, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)  # (B, channels, H, W) in [-1, 1]


class GanomalyGenerator(nn.Module):
    """GANomaly's generator: z = E1(x), x_hat = Dec(z), z_hat = E2(x_hat).

    The original paper scores by ||z - z_hat||: the second encoder, run on the
    reconstruction, exposes what the bottleneck could not reproduce.
    """

    def __init__(
        self, channels: int, image_size: int, width: int = 64, latent_dim: int = 100
    ) -> None:
        super().__init__()
        self.encoder1 = DcganEncoder(channels, image_size, width, latent_dim)
        self.decoder = DcganDecoder(channels, image_size, width, latent_dim)
        self.encoder2 = DcganEncoder(channels, image_size, width, latent_dim)

    def forward(self, x: Tensor) -> GeneratorOutput:
        z = self.encoder1(x)  # (B, latent_dim, 1, 1)
        x_hat = self.decoder(z)  # (B, C, H, W)
        z_hat = self.encoder2(x_hat)  # (B, latent_dim, 1, 1)
        return GeneratorOutput(x_hat, z, z_hat)


# ---------------------------------------------------------------------------------------
# Skip-GANomaly: a pix2pix U-Net with skip connections at every scale.


class SkipGanomalyGenerator(nn.Module):
    """Skip-GANomaly's U-Net generator (the pix2pix ``UnetGenerator`` it uses).

    Down: conv4x4 s2 (+ BN except at both ends), LeakyReLU(0.2) before each but the first.
    Up: ReLU, transposed conv4x4 s2 (+ BN except the last), concatenated with the skip of
    the same resolution; the last ends in tanh. It halves the map while it is even, so
    powers of two reach 1x1 (32 -> 5 levels) and 48 stops at 3x3. Widths are
    ``width * min(2**k, 8)`` as in pix2pix.
    """

    def __init__(self, channels: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size={image_size} must be a positive multiple of 4")
        levels = 0  # how many times the map halves exactly
        while image_size % 2 ** (levels + 1) == 0:
            levels += 1
        widths = [width * min(2**k, 8) for k in range(levels)]
        down: list[nn.Module] = []
        up: list[nn.Module] = []
        for k in range(levels):
            outermost, innermost = k == 0, k == levels - 1
            d_in = channels if outermost else widths[k - 1]
            d_layers: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2)]
            d_layers.append(nn.Conv2d(d_in, widths[k], 4, 2, 1, bias=False))
            if not (outermost or innermost):
                d_layers.append(nn.BatchNorm2d(widths[k]))
            down.append(nn.Sequential(*d_layers))

            # The innermost level has no skip to concatenate, so its input is not doubled.
            u_in = widths[k] if innermost else 2 * widths[k]
            u_out = channels if outermost else widths[k - 1]
            u_layers: list[nn.Module] = [
                nn.ReLU(),
                nn.ConvTranspose2d(u_in, u_out, 4, 2, 1, bias=outermost),
            ]
            u_layers.append(nn.Tanh() if outermost else nn.BatchNorm2d(u_out))
            up.append(nn.Sequential(*u_layers))
        self.down = nn.ModuleList(down)
        self.up = nn.ModuleList(up)

    def forward(self, x: Tensor) -> GeneratorOutput:
        skips = []
        for block in self.down:
            x = block(x)  # (B, widths[k], H / 2**(k+1), W / 2**(k+1))
            skips.append(x)
        x = self.up[-1](skips[-1])  # innermost: (B, widths[-2], ...) at the next level up
        for k in range(len(self.up) - 2, -1, -1):
            x = self.up[k](torch.cat([skips[k], x], dim=1))  # (B, widths[k-1] or C, 2x size)
        return GeneratorOutput(x)
