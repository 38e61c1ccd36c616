"""Factories: a generator by name (the nested model or a baseline) and its discriminator,
DCGAN-initialised. Imports both ``model`` and ``baselines``, which do not import it."""

from __future__ import annotations

from torch import nn

from components.config import ModelConfig
from components.detector.model import (
    GENERATOR_NAMES,
    Discriminator,
    NestedGenerator,
    _check_image_size,
    init_weights,
)
from components.detector.restore import NestedRestoreGenerator


def build_generator(
    name: str, channels: int, image_size: int, base_width: int, depth: int, latent_dim: int,
    seg_width: int = 8, seg_depth: int = 3,
) -> nn.Module:
    """A DCGAN-initialised generator by name: ``nested``, ``ganomaly``, ``skip_ganomaly`` or
    ``nested_restore`` (the nested generator plus a segmentation head, ``restore``).

    ``depth`` applies to the nested ones, ``latent_dim`` to ``ganomaly``, ``seg_*`` to
    ``nested_restore`` only. Raises
    ValueError for an unknown name or an image size the network cannot reconstruct.
    """
    # Imported here: baselines builds on this module's blocks, so a top-level import
    # would be circular.
    from components.detector.baselines import GanomalyGenerator, SkipGanomalyGenerator

    if name not in GENERATOR_NAMES:
        raise ValueError(f"unknown generator {name!r}; expected one of {GENERATOR_NAMES}")
    _check_image_size(image_size, 16)
    net: nn.Module
    if name == "nested":
        _check_image_size(image_size, 2**depth)
        net = NestedGenerator(channels, base_width, depth)
    elif name == "nested_restore":
        _check_image_size(image_size, 2 ** max(depth, seg_depth))
        net = NestedRestoreGenerator(channels, base_width, depth, seg_width, seg_depth)
    elif name == "ganomaly":
        net = GanomalyGenerator(channels, image_size, base_width, latent_dim)
    else:
        net = SkipGanomalyGenerator(channels, image_size, base_width)
    init_weights(net)
    return net


def build_discriminator(channels: int, image_size: int, width: int) -> nn.Module:
    """A DCGAN-initialised :class:`Discriminator`; ValueError unless image_size is a
    positive multiple of 16."""
    net = Discriminator(channels, image_size, width)
    init_weights(net)
    return net


def build_networks(
    model_cfg: ModelConfig, channels: int, image_size: int, disc_image_size: int | None = None
) -> tuple[nn.Module, nn.Module]:
    """G and D for a config, DCGAN-initialised (uses the global torch RNG).

    ``disc_image_size``: the side D is built for when training used crops (``train.crop``);
    G is fully convolutional and takes any multiple of 2**depth."""
    generator = build_generator(
        model_cfg.name,
        channels,
        image_size,
        model_cfg.base_width,
        model_cfg.depth,
        model_cfg.latent_dim,
        model_cfg.seg_width,
        model_cfg.seg_depth,
    )
    discriminator = build_discriminator(channels, disc_image_size or image_size,
                                        model_cfg.disc_width)
    return generator, discriminator
