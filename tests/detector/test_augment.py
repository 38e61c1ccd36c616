"""Augmentation: off means untouched, each transform keeps shape and range, seeded."""

import torch

from components.config import AugmentConfig
from components.detector.augment import augment_batch, crop_offsets, random_crop


def _batch(n: int = 6, c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_everything_off_returns_the_images_unchanged() -> None:
    x = _batch()
    assert torch.equal(augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(1)), x)


def test_flips_and_rotations_permute_pixels_only() -> None:
    x = _batch()
    cfg = AugmentConfig(hflip=True, vflip=True, rot90=True)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    for a, b in zip(out, x, strict=True):  # same multiset of values per image
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    assert not torch.equal(out, x)


def test_same_seed_same_augmentation() -> None:
    x = _batch()
    cfg = AugmentConfig(hflip=True, shift=0.2, brightness=0.2, contrast=0.2)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_rot90_is_skipped_for_non_square_images() -> None:
    x = _batch(h=16, w=32)
    out = augment_batch(x, AugmentConfig(rot90=True), torch.Generator().manual_seed(4))
    assert torch.equal(out, x)


def test_random_crop_takes_windows_of_the_image() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = random_crop(x, 4, torch.Generator().manual_seed(5))
    assert out.shape == (2, 1, 4, 4)
    for crop, image in zip(out, x, strict=True):
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 8)
        assert torch.equal(crop, image[:, top:top + 4, left:left + 4])
    assert torch.equal(random_crop(x, 8, torch.Generator()), x)


def test_crop_offsets_cover_the_border_about_as_often_as_the_centre() -> None:
    side, size = 128, 64
    offsets = crop_offsets(side, size, 40_000, torch.Generator().manual_seed(0))
    assert int(offsets.min()) == 0 and int(offsets.max()) == side - size
    rows = torch.arange(side)
    covered = ((offsets[:, None] <= rows) & (rows < offsets[:, None] + size)).float().mean(0)
    expected_border = size / (side + size - 1)  # 0.335
    assert abs(float(covered[0]) - expected_border) < 0.01
    assert abs(float(covered[-1]) - expected_border) < 0.01
    assert float(covered.max()) < 2.05 * float(covered.min())  # uniform offsets: 65x
