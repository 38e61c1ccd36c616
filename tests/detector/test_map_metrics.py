"""Pixel metrics on hand-computed inputs, and the map post-processing the detector applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.detector.map_metrics import (
    MapStats,
    _label_regions,
    _label_regions_numpy,
    aupro,
    fit_map_stats,
    gaussian_blur,
    hot_normal_figures,
    normalise_maps,
    pixel_auroc,
    top_k_mean,
    upsample_maps,
)


def _masks(seed: int = 0, shape: tuple[int, int, int] = (4, 16, 16)) -> np.ndarray:
    """Masks with a few rectangles on some images; the last image is normal."""
    rng = np.random.default_rng(seed)
    masks = np.zeros(shape, dtype=bool)
    for image in range(shape[0] - 1):
        for _ in range(2):
            y, x = rng.integers(0, shape[1] - 4), rng.integers(0, shape[2] - 4)
            masks[image, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    return masks


def _brute_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    positives, negatives = maps[masks != 0], maps[masks == 0]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return (greater + 0.5 * ties) / (positives.size * negatives.size)


# --- pixel AUROC --------------------------------------------------------------------------------


def test_perfect_and_inverted_maps() -> None:
    masks = _masks()
    perfect = masks + 0.1 * np.random.default_rng(1).random(masks.shape)
    assert pixel_auroc(perfect, masks) == 1.0
    assert aupro(perfect, masks) == 1.0
    assert pixel_auroc(-perfect, masks) == 0.0
    assert aupro(-perfect, masks) == 0.0


def test_random_map_is_near_one_half() -> None:
    rng = np.random.default_rng(2)
    masks = rng.random((20, 32, 32)) < 0.2
    assert pixel_auroc(rng.random(masks.shape), masks) == pytest.approx(0.5, abs=0.02)


def test_constant_map_ties_count_one_half() -> None:
    masks = _masks()
    constant = np.full(masks.shape, 0.3, dtype=np.float32)
    assert pixel_auroc(constant, masks) == 0.5
    # One tied group: the curve is the straight line (0, 0) -> (1, 1), area 0.3^2 / 2 over 0.3.
    assert aupro(constant, masks) == pytest.approx(0.15)


def test_pixel_auroc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(3)
    maps = rng.integers(0, 6, (3, 7, 9)).astype(np.float32)  # many ties
    masks = rng.random(maps.shape) < 0.3
    assert pixel_auroc(maps, masks) == pytest.approx(_brute_auroc(maps, masks), abs=1e-12)


def test_accepts_tensors_and_uint8_masks() -> None:
    masks = _masks()
    maps = np.random.default_rng(4).random(masks.shape).astype(np.float32)
    expected = pixel_auroc(maps, masks)
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) == expected
    assert pixel_auroc(maps, masks.astype(np.uint8) * 255) == expected
    assert pixel_auroc(maps[:, None], masks) == expected  # (N, 1, H, W) maps


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_metrics_reject_masks_of_one_class(metric) -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="anomalous pixel"):
        metric(maps, np.zeros(maps.shape, dtype=bool))
    with pytest.raises(ValueError, match="normal pixel"):
        metric(maps, np.ones(maps.shape, dtype=bool))


def test_metrics_reject_bad_inputs() -> None:
    masks = _masks()
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(np.zeros((4, 16, 15)), masks)
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.full(masks.shape, np.nan), masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros(masks.shape), masks, fpr_limit=0.0)


# --- AUPRO --------------------------------------------------------------------------------------

# One 4x4 image: region A = two pixels (0.9, 0.5), region B = one pixel (0.7); 13 normal pixels:
# 0.8, 0.6, 0.5 (tied with A's second pixel) and ten at 0.1.
HAND_MAP = np.array(
    [
        [0.9, 0.5, 0.8, 0.1],
        [0.6, 0.1, 0.5, 0.1],
        [0.1, 0.1, 0.1, 0.7],
        [0.1, 0.1, 0.1, 0.1],
    ],
    dtype=np.float32,
)[None]
HAND_MASK = np.zeros((1, 4, 4), dtype=bool)
HAND_MASK[0, 0, :2] = True  # region A
HAND_MASK[0, 2, 3] = True  # region B

# Curve (FPR, PRO) by threshold, PRO = (fraction of A + fraction of B) / 2:
#   start (0, 0); t=0.9 (0, 0.25); t=0.8 (1/13, 0.25); t=0.7 (1/13, 0.75);
#   t=0.6 (2/13, 0.75); t=0.5 (3/13, 1) (the tie moves both at once); t=0.1 (1, 1).
# Up to 0.2: 0.25/13 + 0.75/13 + the piece 2/13 -> 0.2, where PRO is interpolated as
#   0.75 + 0.25 * (0.2 - 2/13) * 13 = 0.9, area (0.6/13) * (0.75 + 0.9) / 2 = 0.495/13.
#   Total 1.495/13 = 0.115; AUPRO = 0.115 / 0.2 = 0.575.
# Up to 0.3: 0.25/13 + 0.75/13 + 0.875/13 (the tied diagonal) + (0.3 - 3/13) * 1
#   = 0.3 - 1.125/13; AUPRO = 1 - 1.125/3.9.


def test_aupro_hand_computed() -> None:
    assert aupro(HAND_MAP, HAND_MASK, fpr_limit=0.2) == pytest.approx(0.575, abs=1e-12)
    assert aupro(HAND_MAP, HAND_MASK, fpr_limit=0.3) == pytest.approx(1 - 1.125 / 3.9, abs=1e-12)


def _brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Every distinct threshold evaluated directly, then the clipped trapezoid."""
    labels, count = _label_regions(masks)
    regions = [labels == k for k in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & ~masks).sum() / (~masks).sum()
        points.append((fpr, np.mean([above[r].mean() for r in regions])))
    x, y = np.array(points).T
    inside = x <= limit
    y_limit = y[inside][-1] if x[inside][-1] == limit else np.interp(limit, x, y)
    xs, ys = np.append(x[inside], limit), np.append(y[inside], y_limit)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / limit)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_direct_sweep(limit: float) -> None:
    rng = np.random.default_rng(5)
    masks = _masks(seed=6, shape=(3, 9, 9))
    maps = rng.integers(0, 12, masks.shape).astype(np.float32) + 3 * masks
    assert aupro(maps, masks, limit) == pytest.approx(_brute_aupro(maps, masks, limit), abs=1e-9)


def test_regions_are_four_connected_per_image() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: two regions
    masks[0, 3, :] = True  # a row touching the next image's row, which it must not join
    masks[1, 0, :] = True
    for label in (_label_regions, _label_regions_numpy):
        assert label(masks)[1] == 4


def test_numpy_labeller_matches_scipy() -> None:
    masks = np.random.default_rng(7).random((3, 20, 20)) < 0.55
    fast, count = _label_regions(masks)
    fallback, fallback_count = _label_regions_numpy(masks)
    assert count == fallback_count
    # Same partition: labels correspond one to one.
    assert len(set(zip(fast.ravel(), fallback.ravel(), strict=True))) == count + 1


# --- post-processing ------------------------------------------------------------------------------


def test_gaussian_blur_keeps_shape_constants_and_mass() -> None:
    maps = torch.zeros(2, 1, 33, 29)
    maps[:, :, 14:18, 12:16] = 1.0
    blurred = gaussian_blur(maps, sigma=2.0)
    assert blurred.shape == maps.shape and blurred.dtype == maps.dtype
    assert blurred.sum().item() == pytest.approx(maps.sum().item(), rel=1e-4)
    assert blurred.max() < 1.0  # it did smooth
    constant = torch.full((1, 1, 5, 6), 0.7)
    assert torch.allclose(gaussian_blur(constant, sigma=4.0), constant)  # radius > map size
    assert gaussian_blur(maps, sigma=0.0) is maps


def test_gaussian_blur_matches_scipy_mirror_mode() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    maps = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = ndimage.gaussian_filter(maps[0, 0].numpy(), sigma=1.5, mode="mirror", truncate=4.0)
    assert np.allclose(gaussian_blur(maps, 1.5)[0, 0].numpy(), expected, atol=1e-12)


def test_upsample_maps() -> None:
    maps = torch.rand(3, 1, 8, 8)
    assert upsample_maps(maps, (32, 24)).shape == (3, 1, 32, 24)
    assert upsample_maps(maps[:, 0], 16).shape == (3, 16, 16)
    assert upsample_maps(maps, 8) is maps
    assert torch.allclose(upsample_maps(torch.full((1, 1, 4, 4), 0.5), 9), torch.tensor(0.5))


def test_top_k_mean_values_and_batch_independence() -> None:
    single = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    assert top_k_mean(single, 0.25).item() == 4.0
    assert top_k_mean(single, 0.5).item() == 3.5
    batch = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    together = top_k_mean(batch, 0.01)
    alone = torch.cat([top_k_mean(batch[i : i + 1], 0.01) for i in range(6)])
    assert together.shape == (6,)
    assert torch.equal(together, alone)
    assert torch.equal(top_k_mean(batch.flip(0), 0.01), together.flip(0))
    with pytest.raises(ValueError, match="fraction"):
        top_k_mean(batch, 0.0)


def test_normalise_maps_with_validation_statistics() -> None:
    rng = np.random.default_rng(8)
    val_maps = rng.gamma(2.0, 0.1, (20, 16, 16)).astype(np.float32)
    stats = fit_map_stats(val_maps)
    assert stats == fit_map_stats(val_maps)  # deterministic
    assert stats.low < stats.high
    normal = normalise_maps(rng.gamma(2.0, 0.1, (5, 16, 16)).astype(np.float32), stats)
    assert normal.min() >= 0.0 and normal.max() <= 1.0
    assert (normal == 0).mean() > 0.4 and normal.mean() < 0.2 and (normal == 1).mean() < 0.01
    anomalous = normalise_maps(torch.full((1, 1, 4, 4), stats.high * 2), stats)
    assert isinstance(anomalous, torch.Tensor) and torch.all(anomalous == 1.0)


def test_fit_map_stats_on_constant_maps_gives_a_usable_scale() -> None:
    stats = fit_map_stats(torch.full((3, 8, 8), 0.25))
    assert isinstance(stats, MapStats) and stats.high > stats.low
    assert np.isfinite(normalise_maps(np.full((2, 2), 0.3), stats)).all()


def test_hot_normal_figures_count_pixels_and_images_above_the_level():
    maps = np.zeros((4, 2, 5), np.float32)
    maps[0, 0, 0] = 0.9  # one hot pixel in image 0
    maps[1, :, :] = 0.6  # image 1 hot everywhere (10 pixels)
    maps[2, 1, 4] = 0.5  # exactly at the level: not above
    found = hot_normal_figures(maps)
    assert found == {"level": 0.5, "pixels_above": pytest.approx(11 / 40), "images_above": 0.5}
    assert hot_normal_figures(maps, level=0.95)["images_above"] == 0.0
    with pytest.raises(ValueError, match="normal_maps"):
        hot_normal_figures(maps[0])
