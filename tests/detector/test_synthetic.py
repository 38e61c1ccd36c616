"""Synthetic anomalies: non-empty masks inside the image, deterministic per seed, in range."""

import pytest
import torch

from components.config import SyntheticConfig
from components.detector.synthetic import (
    TEXTURE_KINDS,
    perlin_mask,
    scratch_mask,
    synthesize_anomalies,
)


def _batch(channels: int, n: int = 6, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("texture", TEXTURE_KINDS)
def test_every_corrupted_image_has_a_non_empty_mask_and_stays_in_range(channels, texture):
    x = _batch(channels)
    cfg = SyntheticConfig(probability=1.0, textures=(texture,), feather=0.0)
    xt, m = synthesize_anomalies(x, cfg, torch.Generator().manual_seed(0))
    assert xt.shape == x.shape and xt.dtype == x.dtype
    assert m.shape == (len(x), 1, 32, 32)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.flatten(1).sum(1) > 0).all()
    assert xt.min() >= -1 and xt.max() <= 1
    # hard edges (feather 0): outside the mask the image is untouched
    assert torch.equal(xt * (1 - m), x * (1 - m))


def test_same_seed_same_anomalies_other_seed_others():
    x = _batch(3)
    cfg = SyntheticConfig(probability=1.0)
    a = synthesize_anomalies(x, cfg, torch.Generator().manual_seed(5))
    b = synthesize_anomalies(x, cfg, torch.Generator().manual_seed(5))
    c = synthesize_anomalies(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_probability_zero_leaves_images_clean_and_one_corrupts_all():
    x = _batch(1, n=8)
    xt, m = synthesize_anomalies(x, SyntheticConfig(probability=0.0),
                                 torch.Generator().manual_seed(0))
    assert torch.equal(xt, x) and m.sum() == 0
    _, m = synthesize_anomalies(x, SyntheticConfig(probability=1.0),
                                torch.Generator().manual_seed(0))
    assert (m.flatten(1).amax(1) == 1).all()


def test_mask_area_follows_the_configured_range():
    cfg = SyntheticConfig(min_area=0.01, max_area=0.05)
    g = torch.Generator().manual_seed(0)
    areas = [perlin_mask(64, 64, cfg, g, torch.device("cpu")).mean().item() for _ in range(20)]
    assert all(0.009 <= a <= 0.06 for a in areas)  # ties at the threshold add a little


def test_scratch_masks_are_thin_and_inside():
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        m = scratch_mask(64, 48, g, torch.device("cpu"))
        assert m.shape == (64, 48) and 0 < m.mean() < 0.2


def test_feathered_edges_blend_softly_and_keep_the_hard_mask_as_label():
    x = torch.full((4, 1, 48, 48), -1.0)  # black images, a white flat texture: alpha is visible
    hard = SyntheticConfig(probability=1.0, textures=("colour",), opacity_min=1.0,
                           scratch_fraction=0.0, feather=0.0)
    soft = hard.model_copy(update={"feather": 3.0})
    xh, mh = synthesize_anomalies(x, hard, torch.Generator().manual_seed(2))
    xs, ms = synthesize_anomalies(x, soft, torch.Generator().manual_seed(2))
    assert set(ms.unique().tolist()) <= {0.0, 1.0} and (ms.flatten(1).sum(1) > 0).all()
    changed_outside = ((xs != x) & (ms == 0)).flatten(1).any(1)
    assert changed_outside.any()  # the blend runs past the label's edge ...
    assert not ((xh != x) & (mh == 0)).any()  # ... which hard edges never do
    assert xs.min() >= -1 and xs.max() <= 1
    again = synthesize_anomalies(x, soft, torch.Generator().manual_seed(2))
    assert torch.equal(again[0], xs) and torch.equal(again[1], ms)


def test_fewer_lattice_cells_give_masks_in_fewer_pieces():
    from scipy import ndimage

    def mean_pieces(max_cells: int) -> float:
        cfg = SyntheticConfig(min_area=0.2, max_area=0.3, max_cells=max_cells)
        g = torch.Generator().manual_seed(0)
        return sum(ndimage.label(perlin_mask(64, 64, cfg, g, torch.device("cpu")).numpy())[1]
                   for _ in range(30)) / 30

    few, many = mean_pieces(2), mean_pieces(32)
    assert few < 3 < many  # 1-2 cells per side: a blob or two; up to 32: specks


def test_max_cells_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="max_cells"):
        SyntheticConfig(max_cells=12)
