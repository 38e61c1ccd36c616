"""The fully-nested encoder-decoder GAN of Zhang (2022), read top-down like its Figure 2.

Small pieces first: the residual block every node is made of, then the shared encoder
column X^{i,0}, the nested decoder nodes X^{i,j}, the generator that wires them, the
DCGAN discriminator, and finally the factories that the training step calls.

Notation: X^{i,j} is the node at level i (resolution H / 2**i, width base_width * 2**i)
and column j. Column 0 is the encoder; column j >= 1 holds the j-th decoder branch, a
sub-U-Net of depth j whose output is X^{0,j}. The reconstruction is read from X^{0,depth}.

Design choices:
- Downsampling is 2x2 max-pooling (as in UNet++): parameter-free, so every learned weight
  sits in a residual block, and it keeps the strongest local response for the deeper codes.
- Upsampling is bilinear x2 (align_corners=False) followed by the node's own convolutions:
  transposed convolutions leave checkerboard artefacts, and those would show up in the
  reconstruction error that *is* the anomaly score.
- Every convolution followed by BatchNorm has no bias (the BN shift makes it redundant and
  it would receive an exactly-zero gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

GENERATOR_NAMES = ("nested", "ganomaly", "skip_ganomaly", "nested_restore")


class GeneratorOutput(NamedTuple):
    """What every generator returns.

    ``image`` is the reconstruction (B, C, H, W) in [-1, 1]. ``latent_in`` / ``latent_out``
    are GANomaly's bottleneck codes z = E1(x) and z_hat = E2(x_hat), (B, latent_dim, 1, 1);
    ``None`` for generators without a second encoder. ``map_logits`` (B, 1, H, W) is the
    restoration detector's segmentation of the anomaly (``restore``); ``None`` otherwise.
    """

    image: Tensor
    latent_in: Tensor | None = None
    latent_out: Tensor | None = None
    map_logits: Tensor | None = None


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU; keeps H and W.

    The shortcut is the identity when widths match, else a 1x1 conv + BN projection, so
    the nested nodes (whose input is a wide concatenation) can still add a residual.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, out_ch, H, W)
        out = self.bn2(self.conv2(out))  # (B, out_ch, H, W)
        return F.relu(out + self.shortcut(x))  # (B, out_ch, H, W)


class NestedEncoder(nn.Module):
    """Returns [X^{0,0}, ..., X^{depth,0}]; level i is (B, base_width * 2**i, H/2**i, W/2**i).

    A stem block at full resolution, then ``depth`` stages of 2x2 max-pool + residual block.
    """

    def __init__(self, channels: int, base_width: int, depth: int) -> None:
        super().__init__()
        widths = [base_width * 2**i for i in range(depth + 1)]
        stages: list[nn.Module] = [ResidualBlock(channels, widths[0])]
        for i in range(1, depth + 1):
            stages.append(nn.Sequential(nn.MaxPool2d(2), ResidualBlock(widths[i - 1], widths[i])))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = []
        for stage in self.stages:
            x = stage(x)  # (B, base_width * 2**i, H / 2**i, W / 2**i)
            levels.append(x)
        return levels


class NestedDecoder(nn.Module):
    """The triangle of decoder nodes; returns X^{0,depth}, (B, base_width, H, W).

    X^{i,j} = ResidualBlock(concat[X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})]).
    The dense skips along a level hand each node every coarser-to-finer refinement made
    so far at that resolution, which is what closes the semantic gap between the encoder
    and decoder features that a plain U-Net skip bridges in one jump.
    """

    def __init__(self, base_width: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.nodes = nn.ModuleDict()
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                width = base_width * 2**i
                # j same-level inputs of `width` channels + one upsampled input of 2*width.
                self.nodes[self.node_name(i, j)] = ResidualBlock(j * width + 2 * width, width)

    @staticmethod
    def node_name(i: int, j: int) -> str:
        """Key of X^{i,j} in ``nodes`` (e.g. ``x0_4``), for hooks and state dicts."""
        return f"x{i}_{j}"

    def forward(self, encoded: list[Tensor]) -> Tensor:
        # grid[i] holds X^{i,0}, X^{i,1}, ... as they are computed, column by column:
        # X^{i,j} needs column j-1 one level down, so the columns must go left to right.
        grid = [[x] for x in encoded]
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                below = F.interpolate(
                    grid[i + 1][j - 1], scale_factor=2.0, mode="bilinear", align_corners=False
                )  # (B, 2 * width_i, H_i, W_i)
                inputs = torch.cat([*grid[i][:j], below], dim=1)  # (B, (j + 2) * width_i, H_i, W_i)
                grid[i].append(self.nodes[self.node_name(i, j)](inputs))  # (B, width_i, H_i, W_i)
        return grid[0][self.depth]


class NestedGenerator(nn.Module):
    """The fully-nested encoder-decoder; reconstructs (B, channels, H, W) in [-1, 1].

    H and W must be multiples of 2**depth (each level halves them).
    """

    def __init__(self, channels: int, base_width: int = 32, depth: int = 4) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: the nested generator needs depth >= 1")
        self.encoder = NestedEncoder(channels, base_width, depth)
        self.decoder = NestedDecoder(base_width, depth)
        self.head = nn.Conv2d(base_width, channels, 1)  # per-pixel projection back to colours

    def forward(self, x: Tensor) -> GeneratorOutput:
        encoded = self.encoder(x)  # [X^{i,0}]: (B, base_width * 2**i, H / 2**i, W / 2**i)
        top = self.decoder(encoded)  # X^{0,depth}: (B, base_width, H, W)
        image = torch.tanh(self.head(top))  # (B, channels, H, W); data is scaled to [-1, 1]
        return GeneratorOutput(image)


def dcgan_pyramid(channels: int, image_size: int, width: int) -> tuple[nn.Sequential, int, int]:
    """DCGAN's strided conv stack; returns ``(layers, out_width, out_size)``.

    conv4x4 s2 + LeakyReLU(0.2) (no BN on the first, as in DCGAN), then conv4x4 s2 + BN +
    LeakyReLU doubling the width while the map halves exactly and stays >= 4. Powers of two
    end at 4x4; other multiples of 16 end at their odd factor (48 -> 6x6, 144 -> 9x9).
    Shared by the discriminator and GANomaly's encoders.
    """
    _check_image_size(image_size, 16)
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
    ]
    size = image_size // 2
    while size % 2 == 0 and size // 2 >= 4:
        layers += [
            nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(width * 2),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width, size = width * 2, size // 2
    return nn.Sequential(*layers), width, size


class Discriminator(nn.Module):
    """DCGAN discriminator; ``forward`` returns ``(logit, features)``.

    ``logit`` is (B,), raw (training uses BCEWithLogits). ``features`` is the last 4x4 map,
    (B, F, 4, 4), compared between real and reconstructed images by the latent loss. For
    sizes that are not powers of two the last map is average-pooled to 4x4.
    """

    def __init__(self, channels: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        self.features, out_width, out_size = dcgan_pyramid(channels, image_size, width)
        self.pool = nn.Identity() if out_size == 4 else nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Conv2d(out_width, 1, 4, 1, 0, bias=False)  # 4x4 -> 1x1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pool(self.features(x))  # (B, F, 4, 4)
        logit = self.classifier(features).flatten()  # (B, 1, 1, 1) -> (B,)
        return logit, features


def init_weights(module: nn.Module) -> None:
    """DCGAN init for ``module`` and all its children: conv weights N(0, 0.02), BN weights
    N(1, 0.02), BN and conv biases 0. Call once as ``init_weights(net)``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _check_image_size(image_size: int, multiple: int) -> None:
    if image_size < multiple or image_size % multiple:
        raise ValueError(f"image_size={image_size} must be a positive multiple of {multiple}")


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs (2 x multiply-accumulates of convs and matmuls) for one input of
    ``input_shape`` (batch included), counted in eval mode under no_grad; the module's
    training mode is restored afterwards."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(input_shape, device=device, dtype=dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())
