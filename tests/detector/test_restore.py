"""The restoration detector learns to find planted defects from synthetic anomalies only,
and its choices (checkpoint, statistics, thresholds) never look at the test split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from components.config import ModelConfig, TrainConfig
from components.data.splits import DatasetSplits, ImageSet
from components.detector.map_metrics import pixel_auroc
from components.detector.score import MapSettings, score_images
from components.detector.train import fit
from components.errors import TrainingError

SIZE = 32
SETTINGS = MapSettings(sigma=1.0, top_k=0.02)
MODEL = ModelConfig(name="nested_restore", base_width=8, depth=2, disc_width=8, seg_width=8,
                    seg_depth=2)


def _texture(n: int, seed: int) -> np.ndarray:
    """Grey sine gratings of random phase and slightly varied frequency, with noise."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = [128 + 50 * np.sin(g.uniform(0.5, 0.7) * xx + g.uniform(0, 2 * np.pi))
           + g.normal(0, 6, (SIZE, SIZE)) for _ in range(n)]
    return np.clip(np.stack(out), 0, 255)


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Textures with one dark disc each (a 'blowhole'), and the discs' masks."""
    g = np.random.default_rng(seed)
    x = _texture(n, seed)
    masks = np.zeros(x.shape, np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        r = int(g.integers(3, 6))
        cy, cx = g.integers(r, SIZE - r, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        x[i][disc] = g.uniform(10, 40)
        masks[i] = disc
    return x, masks


def _set(arr: np.ndarray, anomalous: int = 0, masks: np.ndarray | None = None) -> ImageSet:
    images = torch.from_numpy(arr.astype(np.uint8))[:, None]
    flags = np.r_[np.zeros(len(arr) - anomalous, int), np.ones(anomalous, int)]
    labels = ["good"] * (len(arr) - anomalous) + ["hole"] * anomalous
    out = ImageSet(images, flags, [f"img{i}.png" for i in range(len(arr))], labels)
    if masks is not None:
        out.masks = torch.from_numpy(masks)
    return out


def _train_cfg(**overrides) -> TrainConfig:
    values = dict(steps=150, eval_every=50, batch_size=8, lr=2e-3, select_on="synthetic",
                  threads=1, compile=False, channels_last=False, precision="fp32")
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("restore")
    result = fit(_set(_texture(32, 0)), _set(_texture(8, 1)), MODEL, _train_cfg(),
                 out / "checkpoints", map_settings=SETTINGS)
    return result, out


def test_restoration_training_finds_planted_defects_image_and_pixel(trained) -> None:
    result, _ = trained
    normal = _texture(16, 5)
    bad, masks = _planted(16, 6)
    test = torch.from_numpy(np.concatenate([normal, bad]).astype(np.uint8))[:, None]
    scores = score_images(result.generator, result.discriminator, test, 0.9, result.runtime,
                          settings=SETTINGS, with_maps=True)
    assert scores.maps.shape == (32, SIZE, SIZE)  # a map per image, at the input size
    y = np.r_[np.zeros(16), np.ones(16)]
    assert roc_auc_score(y, scores.score) >= 0.9
    truth = np.concatenate([np.zeros_like(masks), masks])
    assert pixel_auroc(scores.maps, truth) >= 0.9


def test_steps_schedule_runs_intervals_and_keeps_the_synthetic_best(trained) -> None:
    result, _ = trained
    assert [h.steps for h in result.history] == [50, 100, 150]
    criteria = [0.5 * (h.val_synthetic_auroc + h.val_synthetic_pixel_auroc)
                for h in result.history]
    assert result.best_epoch == int(np.argmax(criteria)) + 1
    assert result.history[-1].lr < result.history[0].lr  # the decay follows the steps
    assert all(h.loss_seg > 0 for h in result.history)


def test_score_and_map_do_not_depend_on_batch_composition_or_order(trained) -> None:
    result, _ = trained
    bad, _ = _planted(8, 9)
    images = torch.from_numpy(np.concatenate([_texture(8, 8), bad]).astype(np.uint8))[:, None]
    whole = score_images(result.generator, result.discriminator, images, 0.9, result.runtime,
                         settings=SETTINGS, with_maps=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    shuffled = score_images(result.generator, result.discriminator, images[order], 0.9,
                            result.runtime, batch_size=3, settings=SETTINGS, with_maps=True)
    np.testing.assert_allclose(shuffled.score, whole.score[order.numpy()], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shuffled.maps, whole.maps[order.numpy()], rtol=1e-4, atol=1e-5)


def test_synthetic_selection_needs_a_map_model(tmp_path) -> None:
    with pytest.raises(TrainingError, match="nested_restore"):
        fit(_set(_texture(8, 0)), _set(_texture(4, 1)), ModelConfig(name="nested", base_width=4,
            depth=2, disc_width=8), _train_cfg(steps=2), tmp_path)


def test_the_test_split_chooses_nothing(trained, tmp_path) -> None:
    """Evaluating on two different test splits: same checkpoint, statistics, thresholds,
    map scale and synthetic-validation figures; only the test figures differ."""
    from components.config import Params
    from components.pipeline.stages import evaluate_stage

    _, out = trained
    params = Params(model=MODEL, train=_train_cfg(),
                    data={"layout": "industrial", "anomalous_class": None, "channels": 1,
                          "image_size": SIZE},
                    evaluate={"map_sigma": "auto", "map_top_k": "auto",
                              "plots": False, "overlay_images": 4})
    val = _set(_texture(8, 1))
    reports = []
    for seed in (20, 30):
        run = tmp_path / f"run{seed}"
        shutil.copytree(out / "checkpoints", run / "checkpoints")
        bad, masks = _planted(6, seed)
        test = _set(np.concatenate([_texture(6, seed + 1), bad]), anomalous=6,
                    masks=np.concatenate([np.zeros_like(masks), masks]))
        splits = DatasetSplits(_set(_texture(4, 0)), val, test, pd.DataFrame())
        evaluate_stage(params, run, splits)
        reports.append(json.loads((run / "metrics.json").read_text()))
        assert (run / "plots" / "overlays.png").is_file()
    a, b = reports
    assert a["map_settings"]["chosen_on"] == "synthetic validation"
    assert len(a["map_settings"]["candidates"]) == 12
    for key in ("normalisation", "map_normalisation", "synthetic_validation",
                "checkpoint_epoch", "map_settings", "validation_normals"):
        assert a[key] == b[key], key
    assert a["leak_free"]["at_target_fpr"]["threshold"] == b["leak_free"]["at_target_fpr"][
        "threshold"]
    assert "auroc" in a["pixel"] and "aupro" in a["pixel"]
    # one defect type: its figures are the overall ones
    assert a["per_defect"]["hole"]["count"] == 6
    assert a["per_defect"]["hole"]["image_auroc"] == pytest.approx(a["leak_free"]["auroc"])
    assert a["per_defect"]["hole"]["pixel_auroc"] == pytest.approx(a["pixel"]["auroc"])
    assert a["leak_free"]["auroc"] != b["leak_free"]["auroc"] or a["pixel"] != b["pixel"]
    # the synthetic-validation figures (taken from the chosen candidate) are those of the
    # saved model scoring the synthetic validation set again
    from components.config import SyntheticConfig
    from components.detector.package import load_detector
    from components.detector.synthetic_validation import (
        make_synthetic_validation,
        synthetic_validation_report,
    )
    from components.runtime import resolve_runtime

    detector, _ = load_detector(tmp_path / "run20" / "model")
    data = make_synthetic_validation(val.images, SyntheticConfig())
    again = score_images(detector.generator, detector.discriminator, data.images,
                         detector.weight, resolve_runtime("cpu", "fp32", False, False, 1),
                         settings=detector.settings, with_maps=True)
    found = synthetic_validation_report(again.score, again.maps, data)
    assert a["synthetic_validation"]["image_auroc"] == pytest.approx(found.image_auroc)
    assert a["synthetic_validation"]["pixel_auroc"] == pytest.approx(found.pixel_auroc)
    # how hot the validation normals' maps are: the saved model's maps of them, again
    normal = score_images(detector.generator, detector.discriminator, val.images,
                          detector.weight, resolve_runtime("cpu", "fp32", False, False, 1),
                          settings=detector.settings, with_maps=True)
    hot = normal.maps > 0.5
    assert a["validation_normals"]["pixels_above"] == pytest.approx(hot.mean())
    assert a["validation_normals"]["images_above"] == pytest.approx(hot.any(axis=(1, 2)).mean())


def test_crop_training_builds_d_for_the_crop_and_evaluates_whole_images(tmp_path) -> None:
    from components.config import Params
    from components.detector.package import load_detector
    from components.pipeline.stages import evaluate_stage

    cfg = _train_cfg(steps=4, eval_every=2, crop=16)
    result = fit(_set(_texture(8, 0)), _set(_texture(4, 1)), MODEL, cfg,
                 tmp_path / "checkpoints", map_settings=SETTINGS)
    assert result.history[-1].steps == 4
    params = Params(model=MODEL, train=cfg,
                    data={"layout": "industrial", "anomalous_class": None, "channels": 1,
                          "image_size": SIZE}, evaluate={"plots": False})
    bad, masks = _planted(4, 3)
    test = _set(np.concatenate([_texture(4, 2), bad]), anomalous=4,
                masks=np.concatenate([np.zeros_like(masks), masks]))
    evaluate_stage(params, tmp_path, DatasetSplits(_set(_texture(4, 0)), _set(_texture(4, 1)),
                                                   test, pd.DataFrame()))
    detector, meta = load_detector(tmp_path / "model")
    assert meta["disc_image_size"] == 16 and meta["image_size"] == SIZE
    score, _, _, amap = detector.score_with_maps(torch.zeros(2, 1, SIZE, SIZE))
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    assert float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0


def test_choose_map_settings_takes_the_best_candidate_on_synthetic_validation() -> None:
    from components.detector.synthetic_validation import (
        SyntheticValidationSet,
        choose_map_settings,
    )

    # 2 normal + 2 anomalous images; the anomaly is one bright pixel: smoothing only hurts
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[2, 3, 3] = masks[3, 5, 2] = 1
    maps = np.random.default_rng(0).uniform(0, 0.2, (4, 8, 8)).astype(np.float32)
    maps[masks == 1] = 1.0
    data = SyntheticValidationSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                                  np.array([0, 0, 1, 1]), masks)
    choice = choose_map_settings(maps, data, "auto", 0.01)
    table = choice.candidates
    assert choice.settings.sigma == 0.0 and choice.settings.top_k == 0.01
    assert len(table) == 4 and max(r["criterion"] for r in table) == table[0]["criterion"]
    assert choice.report.image_auroc == table[0]["image_auroc"]
    assert choice.report.pixel_auroc == table[0]["pixel_auroc"]
    fixed = choose_map_settings(maps, data, 2.0, 0.05)
    assert (fixed.settings.sigma, fixed.settings.top_k) == (2.0, 0.05)
    assert len(fixed.candidates) == 1


def test_seg_beta1_puts_the_segmentation_head_in_its_own_adam_group() -> None:
    from components.detector.networks import build_generator
    from components.detector.optimiser_groups import generator_param_groups

    g = build_generator("nested_restore", 1, SIZE, base_width=8, depth=2, latent_dim=16,
                        seg_width=8, seg_depth=2)
    every = {id(p) for p in g.parameters()}
    (one,) = generator_param_groups(g, TrainConfig())  # default: the paper's single group
    assert {id(p) for p in one["params"]} == every and "betas" not in one
    rest, head = generator_param_groups(g, TrainConfig(seg_beta1=0.9))
    assert {id(p) for p in head["params"]} == {id(p) for p in g.segmenter.parameters()}
    assert {id(p) for p in rest["params"]} | {id(p) for p in head["params"]} == every
    assert not {id(p) for p in rest["params"]} & {id(p) for p in head["params"]}
    optimiser = torch.optim.Adam([rest, head], lr=1e-3, betas=(0.5, 0.999))
    assert [group["betas"] for group in optimiser.param_groups] == [(0.5, 0.999), (0.9, 0.999)]
    plain = build_generator("nested", 1, SIZE, base_width=8, depth=2, latent_dim=16)
    assert len(generator_param_groups(plain, TrainConfig(seg_beta1=0.9))) == 1  # no head
