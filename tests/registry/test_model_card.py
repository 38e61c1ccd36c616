"""The model card: rendered from plain data (no MLflow), logged as
``model_card/MODEL_CARD.md`` and set as the registered version's description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow_support import git_head, quiet_env, registered_project

from components.registry.model_card import (
    DESCRIPTION_LIMIT,
    CardFacts,
    card_description,
    render_model_card,
)


def _facts(**changes) -> CardFacts:
    metrics = {
        "leak_free": {"protocol": "leak-free: LABEL-LF", "auroc": 0.8125, "auprc": 0.75,
                      "f1": 0.5, "precision": 0.25, "recall": 1.0, "threshold_used": "fpr",
                      "at_fixed_threshold": {"fpr": 0.375}, "at_target_fpr": {"fpr": 0.0625}},
        "paper_compatible": {"protocol": "paper-compatible: LABEL-PC", "auroc": 0.8125,
                             "auprc": 0.75, "f1": 0.625, "precision": 0.5, "recall": 0.875},
        "thresholds": {"used": "fpr", "fixed": {"value": 0.2, "validation_normal_fpr": 0.3},
                       "fpr": {"value": 0.8123, "validation_normal_fpr": 0.05}},
        "counts": {"val_normal": 40, "test_normal": 16, "test_anomalous": 8},
        "checkpoint_epoch": 3,
        "map_settings": {"sigma": 2.0, "top_k": 0.01},
    }
    base = dict(
        model_name="nestad-detector", version="7", run_id="r123",
        data={"source": "/data/tiles", "layout": "industrial", "image_size": 128, "channels": 1,
              "val_fraction": 0.1, "seed": 0},
        data_version="abc123def456", data_counts={"train": {"normal": 360, "anomalous": 0},
                                                  "test": {"normal": 16, "anomalous": 8}},
        used_counts={"train": 320, "val": 40, **metrics["counts"]}, metrics=metrics,
        model={"name": "nested", "base_width": 16, "depth": 4, "disc_width": 32},
        train={"epochs": 15, "steps": None, "batch_size": 64, "lr": 2e-4, "seed": 0,
               "select_on": "val_recon"},
        evaluate={"score_weight": 0.9, "target_fpr": 0.05, "map_sigma": 2.0},
        code={"git_commit": "f00dfeed", "git_dirty": "false", "dvc_lock_sha256": "d0d0"},
        history={"best_epoch": 3, "device": "cpu", "precision": "fp32"})
    return CardFacts(**(base | changes))


def test_card_states_data_metrics_thresholds_code_and_limits():
    card = render_model_card(_facts())
    assert card.startswith("# Model card: nestad-detector version 7")
    for section in ("Intended use", "Data", "Protocol and metrics", "Thresholds",
                    "Training configuration", "Code version", "Known limits"):
        assert f"## {section}" in card
    assert "`abc123def456`" in card  # data version
    assert "| train (dataset) | 360 | 0 |" in card and "| test (used) | 16 | 8 |" in card
    assert "| leak-free | 0.8125 | 0.7500 | 0.5000 | 0.2500 | 1.0000 |" in card
    assert "| paper-compatible | 0.8125 | 0.7500 | 0.6250 | 0.5000 | 0.8750 |" in card
    assert "LABEL-LF" in card and "LABEL-PC" in card  # each protocol's own label
    # each threshold with its FPR on validation normals (and on test normals), the used one
    assert "| fixed (the paper's 0.2) | 0.2000 | 0.300 | 0.375 |  |" in card
    assert "| target FPR on validation normals | 0.8123 | 0.050 | 0.062 | yes |" in card
    assert "`f00dfeed`" in card and "uncommitted" not in card
    assert "resized to 128 x 128 px" in card and "grey (1 channel)" in card
    # one pixel of 128 is 0.8 % of the side; 2 sigma = 4 px of 128: 3.1 %
    assert "one model-input pixel is 0.8% of the image side (8 px of a 1000 px" in card
    assert "about 4 px across or larger" in card and "3.1% of the side (31 px" in card
    assert "diluted" in card  # the paper model's mean residual
    assert len(card) < DESCRIPTION_LIMIT


def test_card_names_the_anomalous_class_and_the_restoration_score():
    card = render_model_card(_facts(
        data={"source": "c.tar.gz", "layout": "classes", "anomalous_class": "airplane",
              "image_size": 32, "channels": 3},
        model={"name": "nested_restore"}, code={"git_commit": "abc", "git_dirty": "true"}))
    assert "classes other than 'airplane'" in card
    assert "top 1.0% pixels" in card and "RGB (3 channels)" in card
    assert "(uncommitted changes)" in card


def test_a_long_card_is_cut_at_a_section_for_the_description():
    card = render_model_card(_facts()) + "\n## Appendix\n" + "x" * DESCRIPTION_LIMIT
    text = card_description(card, "r123")
    assert len(text) <= DESCRIPTION_LIMIT
    assert "## Known limits" in text and "## Appendix" not in text
    assert "model_card/MODEL_CARD.md of run r123" in text
    short = render_model_card(_facts())
    assert card_description(short, "r123") == short


def test_registered_version_carries_its_card(tmp_path_factory: pytest.TempPathFactory,
                                             tmp_path: Path):
    from components.registry.client import open_registry

    registered = registered_project(tmp_path_factory)
    project, version = registered.project, registered.version
    with quiet_env(tmp_path):
        reg = open_registry(project.params.registry, project.root)
        description = reg.client.get_model_version(version.name, version.version).description
        local = reg.client.download_artifacts(version.run_id, "model_card/MODEL_CARD.md",
                                              str(tmp_path))
    card = Path(local).read_text()
    assert description == card
    metrics = json.loads((project.out / "metrics.json").read_text())
    assert f"version {version.version}" in card
    assert f"`{version.data_version}`" in card
    counts = metrics["counts"]
    assert f"| test (used) | {counts['test_normal']} | {counts['test_anomalous']} |" in card
    assert metrics["leak_free"]["protocol"] in card
    assert metrics["paper_compatible"]["protocol"] in card
    assert f"| leak-free | {metrics['leak_free']['auroc']:.4f} |" in card
    for which in ("fixed", "fpr"):
        t = metrics["thresholds"][which]
        assert f"| {t['value']:.4f} | {t['validation_normal_fpr']:.3f} |" in card
    assert f"`{git_head(project.root)}`" in card
