"""Evaluation: metrics on hand-computed inputs, validation-only normalisation, leak-freedom."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from components.config import EvaluateConfig
from components.data.images import to_model_input
from components.data.splits import ImageSet, load_splits
from components.detector.checkpoints import load_checkpoint
from components.detector.evaluate import (
    NormStats,
    classification_metrics,
    evaluate_scores,
    fit_normalisation,
    normalise,
    per_defect_figures,
)
from components.detector.package import build_detector, load_detector
from components.detector.score import score_images
from components.pipeline.stages import evaluate_stage, score_paths, train_stage
from components.runtime import Runtime

CPU_FP32 = Runtime(torch.device("cpu"), None, False)
CFG = EvaluateConfig()


# --- metrics on hand-computed inputs ------------------------------------------------------


def test_perfectly_separated_scores() -> None:
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), 0.5)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0
    assert (m["f1"], m["precision"], m["recall"], m["fpr"]) == (1.0, 1.0, 1.0, 0.0)


def test_mixed_scores_match_hand_computed_figures() -> None:
    y = np.array([0, 0, 0, 1, 1])
    normed = np.array([0.1, 0.6, 0.3, 0.7, 0.4])
    m = classification_metrics(y, normed, 0.5)
    # flagged: 0.6 (normal) and 0.7 (anomalous) -> TP 1, FP 1, FN 1
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    assert m["fpr"] == pytest.approx(1 / 3)
    # pairs (anomaly > normal): 0.7 beats 3, 0.4 beats 2 of 3 normals -> 5 / 6
    assert m["auroc"] == pytest.approx(5 / 6)
    # ranked 0.7 (P), 0.6 (N), 0.4 (P): AP = 0.5 * 1 + 0.5 * 2/3
    assert m["auprc"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert m["threshold"] == 0.5


def test_threshold_is_inclusive_and_inverted_scores_give_auroc_zero() -> None:
    m = classification_metrics(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9]), 0.2)
    assert m["auroc"] == 0.0
    assert m["recall"] == 0.5  # 0.2 >= 0.2 is flagged
    assert m["fpr"] == 1.0


def test_single_class_test_set_gives_nan_ranking_metrics() -> None:
    m = classification_metrics(np.zeros(4, dtype=int), np.array([0.1, 0.3, 0.5, 0.9]), 0.4)
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"])
    assert m["fpr"] == 0.5


def test_normalise_is_min_max_clipped() -> None:
    out = normalise(np.array([1.0, 2.0, 3.0, 0.0, 5.0]), 1.0, 3.0)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 1.0])
    assert normalise(np.array([2.0]), 2.0, 2.0)[0] == 0.0  # zero span does not divide by 0


# --- normalisation statistics from validation normals ----------------------------------------


def test_fit_normalisation_on_a_known_array() -> None:
    val = 2.0 + np.arange(101) / 100.0  # 2.00, 2.01, ..., 3.00
    rng = np.random.default_rng(0)
    norm = fit_normalisation(rng.permutation(val), CFG)
    assert (norm.score_min, norm.score_max) == (2.0, 3.0)
    assert norm.count == 101
    assert norm.quantiles == pytest.approx({"q0.5": 2.5, "q0.9": 2.9, "q0.95": 2.95, "q0.99": 2.99})
    assert norm.threshold_fixed == 0.2 and norm.target_fpr == 0.05
    assert norm.threshold("fixed") == 0.2 and norm.threshold("fpr") == norm.threshold_fpr


@pytest.mark.parametrize("n", [20, 50, 100, 101, 121, 1000, 1001])
@pytest.mark.parametrize("target_fpr", [0.05, 0.1])
def test_fpr_threshold_flags_at_most_target_fpr_of_validation(n: int, target_fpr: float) -> None:
    cfg = EvaluateConfig(target_fpr=target_fpr)
    val = np.random.default_rng(n).normal(size=n)
    norm = fit_normalisation(val, cfg)
    normed = normalise(val, norm.score_min, norm.score_max)
    flagged = normed >= norm.threshold_fpr
    assert flagged.mean() <= target_fpr
    # ...and it is the smallest such threshold: the next validation score down would
    # flag more than target_fpr
    below = normed[~flagged].max()
    assert (normed >= below).mean() > target_fpr


def test_fit_normalisation_refuses_empty_validation() -> None:
    with pytest.raises(ValueError, match="no validation scores"):
        fit_normalisation(np.array([]), CFG)


def test_normalisation_does_not_depend_on_the_test_scores() -> None:
    rng = np.random.default_rng(0)
    val = rng.normal(1.0, 0.1, size=40)
    a = evaluate_scores(val, rng.normal(1.0, 0.1, 30), np.r_[np.zeros(15), np.ones(15)], CFG, 3)
    b = evaluate_scores(val, rng.normal(9.0, 5.0, 7), np.r_[np.zeros(3), np.ones(4)], CFG, 3)
    assert a.norm == b.norm == fit_normalisation(val, CFG)
    assert a.counts == {"val_normal": 40, "test_normal": 15, "test_anomalous": 15}


def test_threshold_free_metrics_do_not_depend_on_the_normalisation() -> None:
    """AUROC/AUPRC rank the raw scores; clipping to the validation range must not tie them."""
    val = np.array([0.0, 1.0])
    test = np.array([0.5, 2.0, 3.0, 4.0])  # one normal above the validation max
    y = np.array([0, 0, 1, 1])
    report = evaluate_scores(val, test, y, CFG, 1)
    assert roc_auc_score(y, test) == 1.0
    assert report.leak_free["auroc"] == pytest.approx(1.0)
    assert report.leak_free["auprc"] == pytest.approx(1.0)
    assert report.leak_free["auroc"] == pytest.approx(report.paper_compatible["auroc"])


def test_per_defect_figures_rank_each_type_against_the_normals() -> None:
    # normals 0.1 0.2 0.3; crack 0.25 (above two normals of three) and 0.9; hole 0.05
    scores = np.array([0.1, 0.2, 0.3, 0.25, 0.9, 0.05])
    labels = ["good", "good", "good", "crack", "crack", "hole"]
    y = np.array([0, 0, 0, 1, 1, 1])
    maps = np.zeros((6, 2, 2), dtype=np.float32)
    masks = np.zeros((6, 2, 2), dtype=bool)
    maps[3, 0, 0] = maps[4, 0, 0] = 1.0  # crack marked where the map is hot
    masks[3, 0, 0] = masks[4, 0, 0] = True
    masks[5, 1, 1] = True  # hole marked where the map is cold (0, like the normals)
    out = per_defect_figures(scores, labels, y, maps, masks)
    assert set(out) == {"crack", "hole"}
    assert out["crack"]["count"] == 2 and out["hole"]["count"] == 1
    assert out["crack"]["image_auroc"] == pytest.approx(5 / 6)
    assert out["hole"]["image_auroc"] == 0.0
    assert out["crack"]["pixel_auroc"] == 1.0
    assert out["hole"]["pixel_auroc"] == pytest.approx(0.5)  # tied with all 15 normal pixels
    assert "pixel_auroc" not in per_defect_figures(scores, labels, y)["crack"]


def test_both_protocols_are_reported_and_labelled() -> None:
    val = np.linspace(0.0, 1.0, 21)
    test = np.array([0.1, 0.5, 0.9, 1.5, 2.0])
    y = np.array([0, 0, 0, 1, 1])
    report = evaluate_scores(val, test, y, CFG, 4).to_json()
    assert report["leak_free"]["protocol"].startswith("leak-free")
    assert report["paper_compatible"]["protocol"].startswith("paper-compatible")
    assert report["checkpoint_epoch"] == 4
    # paper protocol: test min-max (0.1 .. 2.0), flagged at 0.2 -> 0.5 (0.21) and above
    assert report["paper_compatible"]["fpr"] == pytest.approx(2 / 3)
    # leak-free at the fixed threshold: validation min-max (0 .. 1)
    assert report["leak_free"]["at_fixed_threshold"]["fpr"] == pytest.approx(2 / 3)
    assert report["leak_free"]["at_target_fpr"]["recall"] == 1.0
    json.dumps(report)  # serialisable as metrics.json


# --- leak-freedom on a trained detector ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth, tiny_params):
    """One tiny industrial run: (params, run folder, splits), trained for one epoch."""
    root = tmp_path_factory.mktemp("evaluation")
    source = synth.dataset(root / "data", "industrial", n_train=16, n_test=6, n_defect=6)
    params = tiny_params(data={"source": str(source), "layout": "industrial"})
    splits = load_splits(params.data)
    train_stage(params, root / "run", splits=splits)
    return params, root / "run", splits


def _networks(params, out: Path):
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    detector = build_detector(params.model, 3, params.data.image_size, 0.9)
    detector.generator.load_state_dict(state["generator"])
    detector.discriminator.load_state_dict(state["discriminator"])
    return detector.generator, detector.discriminator


def _subset(images: ImageSet, idx) -> ImageSet:
    idx = np.array(idx)  # a copy: torch refuses negative strides
    return ImageSet(
        images.images[torch.from_numpy(idx)],
        images.is_anomaly[idx],
        [images.paths[i] for i in idx],
        [images.labels[i] for i in idx],
    )


def test_scores_do_not_depend_on_batch_size_or_order(trained) -> None:
    params, out, splits = trained
    g, d = _networks(params, out)
    images = torch.cat([splits.val.images, splits.test.images])  # (N, C, H, W) uint8
    reference = score_images(g, d, images, 0.9, CPU_FP32, batch_size=len(images))
    assert np.isfinite(reference.score).all() and len(reference.score) == len(images)
    for batch_size in (1, 7, 64):
        scores = score_images(g, d, images, 0.9, CPU_FP32, batch_size=batch_size)
        for field in ("score", "recon", "latent"):
            np.testing.assert_allclose(
                getattr(scores, field),
                getattr(reference, field),
                rtol=0,
                atol=1e-6,
                err_msg=f"{field}, bs {batch_size}",
            )
    perm = np.random.default_rng(0).permutation(len(images))
    shuffled = score_images(g, d, images[torch.from_numpy(perm)], 0.9, CPU_FP32, batch_size=7)
    np.testing.assert_allclose(shuffled.score, reference.score[perm], rtol=0, atol=1e-6)


def test_score_is_the_weighted_sum_of_recon_and_latent(trained) -> None:
    params, out, splits = trained
    g, d = _networks(params, out)
    s = score_images(g, d, splits.test.images, 0.9, CPU_FP32)
    np.testing.assert_allclose(s.score, 0.9 * s.recon + 0.1 * s.latent, rtol=1e-6)
    x = to_model_input(splits.test.images[:1])
    with torch.no_grad():
        g.eval()
        expected = (x - g(x).image).abs().mean().item()
    assert s.recon[0] == pytest.approx(expected, abs=1e-6)
    # a weight of 1 scores reconstruction only
    only_r = score_images(g, d, splits.test.images, 1.0, CPU_FP32)
    np.testing.assert_allclose(only_r.score, s.recon, atol=1e-7)


def test_scores_are_taken_in_eval_mode_and_the_mode_is_restored(trained) -> None:
    params, out, splits = trained
    g, d = _networks(params, out)
    evaluated = score_images(g.eval(), d.eval(), splits.test.images, 0.9, CPU_FP32)
    g.train()
    d.train()
    buffers = copy.deepcopy(dict(g.named_buffers()))
    left_in_train = score_images(g, d, splits.test.images, 0.9, CPU_FP32, batch_size=5)
    np.testing.assert_allclose(left_in_train.score, evaluated.score, rtol=0, atol=1e-6)
    assert g.training and d.training
    for name, value in g.named_buffers():  # BatchNorm running statistics untouched
        assert torch.equal(value, buffers[name]), name


def test_stage_normalisation_does_not_change_when_the_test_data_changes(trained, tmp_path) -> None:
    params, out, splits = trained
    anomalous = np.flatnonzero(splits.test.is_anomaly == 1)
    normal = np.flatnonzero(splits.test.is_anomaly == 0)
    variants = {
        "all": np.arange(len(splits.test)),
        "reversed": np.arange(len(splits.test))[::-1],
        "fewer": np.r_[normal[:2], anomalous[:3]],
    }
    norms: list[NormStats] = []
    scores: dict[str, float] = {}
    for name, idx in variants.items():
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "best.pt").write_bytes(
            (out / "checkpoints" / "best.pt").read_bytes()
        )
        subset = dataclasses.replace(splits, test=_subset(splits.test, idx))
        report = evaluate_stage(params, run, splits=subset)
        norms.append(report.norm)
        assert report.counts["test_normal"] + report.counts["test_anomalous"] == len(idx)
        with (run / "test_scores.csv").open() as fh:
            for row in csv.DictReader(fh):  # every image keeps its score in every variant
                first = scores.setdefault(row["path"], float(row["score"]))
                assert float(row["score"]) == pytest.approx(first, rel=1e-5)
    assert norms[0] == norms[1] == norms[2]
    assert norms[0].count == len(splits.val)


def test_model_file_round_trip_gives_the_same_scores(trained) -> None:
    params, out, splits = trained
    report = evaluate_stage(params, out, splits=splits)
    detector, meta = load_detector(out / "model")
    assert not detector.training
    assert meta["norm"] == report.norm
    assert meta["threshold"] == params.evaluate.threshold
    assert detector.threshold.item() == report.norm.threshold(params.evaluate.threshold)

    g, d = _networks(params, out)
    before = score_images(g, d, splits.test.images, 0.9, CPU_FP32)
    after = score_images(
        detector.generator, detector.discriminator, splits.test.images, 0.9, CPU_FP32
    )
    np.testing.assert_array_equal(after.score, before.score)

    # the detector's own forward applies the saved normalisation and threshold
    score, normed, flagged = detector(to_model_input(splits.test.images))
    np.testing.assert_allclose(score.numpy(), before.score, atol=1e-6)
    expected = normalise(before.score, report.norm.score_min, report.norm.score_max)
    np.testing.assert_allclose(normed.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(flagged.numpy(), expected >= detector.threshold.item())

    # scoring the test image files one by one matches the evaluation's test_scores.csv
    source = Path(params.data.source)
    rows = score_paths(out / "model", [source / "test"], None, batch_size=1)
    with (out / "test_scores.csv").open() as fh:
        evaluated = {r["path"]: float(r["score"]) for r in csv.DictReader(fh)}
    assert len(rows) == len(evaluated)
    for row in rows:
        key = Path(row["path"]).relative_to(source).as_posix()
        assert row["score"] == pytest.approx(evaluated[key], rel=1e-5)


@pytest.mark.parametrize(("y", "missing"), [(np.zeros(4), "anomalous"), (np.ones(4), "normal")])
def test_evaluate_scores_refuses_a_test_split_with_one_class(y: np.ndarray, missing: str) -> None:
    from components.errors import DataError

    with pytest.raises(DataError, match=rf"^the test split has no {missing} images"):
        evaluate_scores(np.linspace(0.0, 1.0, 10), np.linspace(0.0, 1.0, 4), y, CFG, 1)
