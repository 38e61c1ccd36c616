"""Behaviour of the generators and the discriminator on tiny widths (seconds on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.detector.model import (
    GENERATOR_NAMES,
    Discriminator,
    GeneratorOutput,
    NestedGenerator,
    ResidualBlock,
    count_flops,
    init_weights,
)
from components.detector.networks import build_discriminator, build_generator

WIDTH = 8  # tiny widths keep the whole file in seconds
LATENT = 16


def _generator(name: str, channels: int = 3, image_size: int = 32) -> nn.Module:
    return build_generator(name, channels, image_size, base_width=WIDTH, depth=4, latent_dim=LATENT)


def _discriminator(channels: int = 3, image_size: int = 32) -> nn.Module:
    return build_discriminator(channels, image_size, width=WIDTH)


def _images(batch: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g) * 2 - 1  # in [-1, 1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", GENERATOR_NAMES)
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_reconstructs_input_shape_in_range(
    name: str, image_size: int, channels: int
) -> None:
    x = _images(2, channels, image_size)
    out = _generator(name, channels, image_size)(x)
    assert isinstance(out, GeneratorOutput)
    assert out.image.shape == x.shape
    assert torch.isfinite(out.image).all()
    assert out.image.abs().max() <= 1.0
    if name == "ganomaly":
        assert out.latent_in.shape == (2, LATENT, 1, 1)
        assert out.latent_out.shape == (2, LATENT, 1, 1)
    else:
        assert out.latent_in is None and out.latent_out is None


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_generator_handles_non_power_of_two_size(name: str) -> None:
    x = _images(2, 3, 48)
    assert _generator(name, 3, 48)(x).image.shape == x.shape


@pytest.mark.parametrize("image_size", [16, 32, 48, 64, 144])
@pytest.mark.parametrize("channels", [1, 3])
def test_discriminator_returns_logit_and_4x4_features(image_size: int, channels: int) -> None:
    logit, features = _discriminator(channels, image_size)(_images(3, channels, image_size))
    assert logit.shape == (3,)
    assert features.shape[0] == 3 and features.shape[2:] == (4, 4)
    assert torch.isfinite(logit).all() and torch.isfinite(features).all()


# --- gradients and learning -----------------------------------------------------------


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_every_parameter_gets_a_finite_nonzero_gradient(name: str) -> None:
    gen, disc = _generator(name), _discriminator()
    x = _images(4)
    out = gen(x)
    logit_fake, feat_fake = disc(out.image)
    _, feat_real = disc(x)
    adv = F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))
    con = F.l1_loss(out.image, x)
    lat = F.mse_loss(feat_fake, feat_real)
    loss = adv + 20 * con + lat
    if out.latent_in is not None:
        loss = loss + F.mse_loss(out.latent_out, out.latent_in)
    if out.map_logits is not None:  # nested_restore: the segmentation head's own loss
        loss = loss + F.binary_cross_entropy_with_logits(
            out.map_logits, (x[:, :1] > 0).float()
        )
    loss.backward()
    for net_name, net in (("G", gen), ("D", disc)):
        for pname, p in net.named_parameters():
            assert p.grad is not None, f"{net_name}.{pname} has no gradient"
            assert torch.isfinite(p.grad).all(), f"{net_name}.{pname} gradient not finite"
            assert p.grad.abs().sum() > 0, f"{net_name}.{pname} gradient is zero"


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_contextual_loss_decreases_with_adam(name: str) -> None:
    # Smooth images (upsampled 4x4 noise) have structure a generator can learn in a few steps.
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    gen = _generator(name, image_size=16)
    opt = torch.optim.Adam(gen.parameters(), lr=5e-3)
    losses = []
    for _ in range(10):
        loss = F.l1_loss(gen(x).image, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# --- leak-freedom: eval output of a sample ignores the rest of the batch ----------------


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_eval_output_does_not_depend_on_batch(name: str) -> None:
    gen, disc = _generator(name), _discriminator()
    x = _images(8, seed=2)
    # A few training-mode forwards so BN running stats are not the trivial 0/1.
    with torch.no_grad():
        for _ in range(3):
            disc(gen(x).image)
    gen.eval()
    disc.eval()
    k = 5
    with torch.no_grad():
        full, alone = gen(x), gen(x[k : k + 1])
        logit_full, feat_full = disc(x)
        logit_alone, feat_alone = disc(x[k : k + 1])
        shuffled = gen(x.flip(0)).image.flip(0)
    torch.testing.assert_close(full.image[k : k + 1], alone.image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shuffled, full.image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logit_full[k : k + 1], logit_alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feat_full[k : k + 1], feat_alone, atol=1e-5, rtol=1e-4)
    if full.latent_in is not None:
        torch.testing.assert_close(full.latent_in[k : k + 1], alone.latent_in, atol=1e-5, rtol=1e-4)


# --- nested generator structure -------------------------------------------------------


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_nested_decoder_is_a_triangle_of_residual_nodes(depth: int) -> None:
    gen = NestedGenerator(3, base_width=WIDTH, depth=depth)
    nodes = gen.decoder.nodes
    assert len(nodes) == depth * (depth + 1) // 2
    assert all(isinstance(node, ResidualBlock) for node in nodes.values())
    expected = {f"x{i}_{j}" for j in range(1, depth + 1) for i in range(depth - j + 1)}
    assert set(nodes.keys()) == expected
    assert len(gen.encoder.stages) == depth + 1


def test_nested_output_is_read_from_the_outermost_node() -> None:
    gen = NestedGenerator(3, base_width=WIDTH, depth=4).eval()
    x = _images(2)
    with torch.no_grad():
        reference = gen(x).image
    seen = []
    outermost = gen.decoder.nodes[gen.decoder.node_name(0, 4)]

    def _zero_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        seen.append(output.shape)
        return torch.zeros_like(output)

    handle = outermost.register_forward_hook(_zero_output)
    try:
        with torch.no_grad():
            blanked = gen(x).image
    finally:
        handle.remove()
    assert seen == [(2, WIDTH, 32, 32)]  # X^{0,4} ran once, at full resolution
    # With X^{0,4} zeroed the image is tanh(head bias) everywhere: nothing else reaches it.
    bias = torch.tanh(gen.head.bias).view(1, 3, 1, 1).expand_as(blanked)
    torch.testing.assert_close(blanked, bias)
    assert not torch.allclose(reference, blanked)


# --- factories and init ---------------------------------------------------------------


def test_build_generator_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown generator 'unet'"):
        build_generator("unet", 3, 32, base_width=WIDTH, depth=4, latent_dim=LATENT)


@pytest.mark.parametrize("name", GENERATOR_NAMES)
@pytest.mark.parametrize("image_size", [0, 24, 40])
def test_build_generator_rejects_bad_image_size(name: str, image_size: int) -> None:
    with pytest.raises(ValueError, match=f"image_size={image_size}"):
        build_generator(name, 3, image_size, base_width=WIDTH, depth=4, latent_dim=LATENT)


def test_build_generator_rejects_size_not_divisible_by_depth() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_generator("nested", 3, 48, base_width=WIDTH, depth=5, latent_dim=LATENT)


@pytest.mark.parametrize("image_size", [0, 8, 24, 100])
def test_build_discriminator_rejects_bad_image_size(image_size: int) -> None:
    with pytest.raises(ValueError, match=f"image_size={image_size}"):
        build_discriminator(3, image_size, width=WIDTH)


def test_init_weights_is_dcgan() -> None:
    net = nn.Sequential(Discriminator(3, 64, width=32), NestedGenerator(3, base_width=16))
    init_weights(net)
    bn = torch.cat([m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    conv = torch.cat(
        [m.weight.flatten() for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    )
    assert abs(bn.mean().item() - 1.0) < 0.01 and abs(bn.std().item() - 0.02) < 0.005
    assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 1e-3
    assert all((m.bias == 0).all() for m in net.modules() if isinstance(m, nn.BatchNorm2d))


# --- performance paths ----------------------------------------------------------------


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_channels_last_gives_the_same_output(name: str) -> None:
    gen, disc = _generator(name).eval(), _discriminator().eval()
    x = _images(2)
    with torch.no_grad():
        expected, (logit, _) = gen(x).image, disc(x)
        gen_cl = gen.to(memory_format=torch.channels_last)
        disc_cl = disc.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        got, (logit_cl, _) = gen_cl(x_cl).image, disc_cl(x_cl)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logit_cl, logit, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_bf16_autocast_forward_is_finite(name: str) -> None:
    gen, disc = _generator(name), _discriminator()
    x = _images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = gen(x).image
        logit, features = disc(image)
    assert image.shape == x.shape and torch.isfinite(image).all()
    assert logit.shape == (2,) and torch.isfinite(logit).all() and torch.isfinite(features).all()


def test_count_flops_matches_hand_count() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).train()
    # 8 outputs x 3*3*3 MACs per output pixel x 16*16 pixels x batch 2, times 2.
    assert count_flops(conv, (2, 3, 16, 16)) == 2 * 8 * 27 * 256 * 2
    assert conv.training  # mode restored


def test_nested_generator_flops_grow_with_width() -> None:
    small = count_flops(NestedGenerator(3, base_width=8), (1, 3, 32, 32))
    large = count_flops(NestedGenerator(3, base_width=16), (1, 3, 32, 32))
    # Almost every conv's cost is quadratic in width.
    assert 3.5 < large / small < 4.1
