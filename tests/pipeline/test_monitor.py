"""``nestad monitor`` end to end on tiny synthetic images: a batch like the training data
passes (exit 0), the same batch 80 grey levels brighter fails with exit 3 naming the
limits, bad input is one line and exit 2; the figures reach MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_support import assert_one_line_error
from mlflow_support import project_template, quiet_env
from PIL import Image
from synthetic_support import build_tiny_params, write_images
from typer.testing import CliRunner

from components.cli.app import get_app
from components.pipeline.monitor import DRIFT_EXIT_CODE

BATCH = 150


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluated run folder (untrained tiny networks) with about 150 validation
    normals, its params.yaml, and two batches: ``like/`` (new images of the training kind)
    and ``bright/`` (the same images + 80 grey levels)."""
    from components.detector.checkpoints import CHECKPOINT_FORMAT, save_atomic
    from components.detector.networks import build_networks
    from components.pipeline.stages import evaluate_stage

    root = tmp_path_factory.mktemp("monitor")
    data = root / "parts"
    write_images(data / "train" / "good", "blob", 330)
    write_images(data / "test" / "good", "blob", 4)
    write_images(data / "test" / "square", "blob", 4, defect=True)
    params = build_tiny_params(
        data={"source": str(data), "layout": "industrial", "anomalous_class": None,
              "val_fraction": 0.45},
        evaluate={"overlay_images": 0}, monitor={"report_dir": str(root / "reports")})
    torch.manual_seed(0)
    g, d = build_networks(params.model, params.data.channels, params.data.image_size)
    save_atomic({"format": CHECKPOINT_FORMAT, "epoch": 1, "generator": g.state_dict(),
                 "discriminator": d.state_dict()}, root / "outputs" / "checkpoints" / "best.pt")
    evaluate_stage(params, root / "outputs")
    tree = params.model_dump(mode="json", exclude={"profiles"})
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    like = write_images(root / "like", "blob", BATCH)
    (root / "bright").mkdir()
    for path in like:
        pixels = np.asarray(Image.open(path), dtype=np.int16) + 80
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "bright" / path.name)
    return root


def _monitor(root: Path, batch: str | Path, *extra: str):
    args = ["monitor", str(batch), "-p", str(root / "params.yaml"), "--model",
            str(root / "outputs"), *extra]
    return CliRunner().invoke(get_app(), args)


def test_evaluation_stores_the_reference_beside_metrics_and_in_the_model(project: Path):
    from components.detector.package import load_detector

    reference = json.loads((project / "outputs" / "monitoring_reference.json").read_text())
    _, meta = load_detector(project / "outputs" / "model")
    assert meta["monitoring_reference"] == reference
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert reference["count"] == metrics["counts"]["val_normal"] >= 120
    assert reference["width"] == [32, 32] and reference["channels"] == []  # raw folder
    fpr = metrics["thresholds"]["fpr"]
    assert fpr["value"] == reference["threshold"]["value"]  # evaluate.threshold: fpr
    assert fpr["validation_normal_fpr"] == pytest.approx(reference["threshold"]
                                                         ["flagged_fraction"])
    assert fpr["validation_normal_fpr"] <= 0.05  # evaluate.target_fpr


def test_a_batch_like_the_training_data_passes(project: Path):
    out = project / "run-like"
    result = _monitor(project, project / "like", "--out", str(out), "--no-track")
    assert result.exit_code == 0, result.output
    assert "no drift" in result.output
    report = json.loads((out / "monitor.json").read_text())
    assert report["images"] == BATCH and report["verdict"]["drift"] is False
    assert report["score"]["ks_pvalue"] > 0.01 and report["score"]["psi"] < 0.25
    assert abs(report["image"]["brightness"]["shift"]) < 5
    assert "| score PSI" in (out / "monitor.md").read_text()


def test_a_brighter_batch_fails_with_exit_3_naming_the_limits(project: Path):
    out = project / "run-bright"
    result = _monitor(project, project / "bright", "--out", str(out), "--no-track")
    assert result.exit_code == DRIFT_EXIT_CODE == 3, result.output
    drift = [line for line in result.output.splitlines() if line.startswith("drift:")]
    assert len(drift) == 1 and "monitor.max_brightness_shift=20" in drift[0]
    report = json.loads((out / "monitor.json").read_text())
    assert report["image"]["brightness"]["shift"] > 50
    assert "max_brightness_shift" in report["verdict"]["exceeded"]
    assert "DRIFT" in (out / "monitor.md").read_text()


def test_an_s3_prefix_is_read_with_the_ingestion_sources(project: Path, moto_endpoint,
                                                         fake_aws):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket="line")
    for path in sorted((project / "bright").iterdir()):
        client.put_object(Bucket="line", Key=f"camera-1/today/{path.name}",
                          Body=path.read_bytes())
    out = project / "run-s3"
    result = _monitor(project, "s3://line/camera-1/today", "--out", str(out), "--no-track",
                      "-s", f"ingest.s3_endpoint_url={moto_endpoint}")
    assert result.exit_code == 3, result.output
    report = json.loads((out / "monitor.json").read_text())
    assert _monitor(project, project / "bright", "--out", str(project / "run-local"),
                    "--no-track").exit_code == 3
    local = json.loads((project / "run-local" / "monitor.json").read_text())
    assert report["images"] == BATCH and report["source"] == "s3://line/camera-1/today"
    assert report["score"] == local["score"]  # the same images give the same figures


def test_the_figures_are_logged_to_mlflow(project: Path, tmp_path_factory):
    from components.registry.client import open_registry

    tmp = tmp_path_factory.mktemp("monitor-mlflow")
    shutil.copy(project_template(tmp_path_factory) / "mlflow.db", project / "mlflow.db")
    with quiet_env(tmp):
        result = _monitor(project, project / "bright", "--out", str(project / "run-tracked"))
        assert result.exit_code == 3, result.output
        params = build_tiny_params()
        reg = open_registry(params.registry, project)
        runs = reg.client.search_runs([reg.client.get_experiment_by_name("nestad").experiment_id],
                                      "tags.`nestad.kind` = 'monitoring'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["monitor.drift"] == 1.0
    assert run.data.metrics["monitor.image.brightness.shift"] > 50
    assert "monitor.score.ks_pvalue" in run.data.metrics
    assert "max_brightness_shift" in run.data.tags["nestad.monitor.exceeded"]
    assert run.data.params["monitor.max_psi"] == "0.25"
    files = {f.path for f in reg.client.list_artifacts(run.info.run_id, "monitoring")}
    assert files == {"monitoring/monitor.json", "monitoring/monitor.md"}


@pytest.mark.parametrize(
    ("what", "needle"),
    [
        ("missing", "no such file or folder"),
        ("empty", "no image files"),
        ("few", "fewer than monitor.min_images=100"),
        ("broken", "not an image file"),
        ("no-model", "no model file"),
        ("bad-limit", "monitor.max_psi"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(project: Path, tmp_path: Path, what: str,
                                          needle: str):
    batch, extra = tmp_path / "batch", ["--no-track"]
    if what == "empty":
        batch.mkdir()
        (batch / "notes.txt").write_text("no images here")
    elif what == "few":
        write_images(batch, "blob", 5)
    elif what == "broken":
        shutil.copytree(project / "like", batch)
        (batch / "zz.png").write_bytes(b"not a png")
    elif what in ("no-model", "bad-limit"):
        batch = project / "like"
    if what == "no-model":
        extra += ["--model", str(tmp_path)]
    if what == "bad-limit":
        extra += ["-s", "monitor.max_psi=-1"]
    result = _monitor(project, batch, *extra)
    assert_one_line_error(result, needle)


def test_a_model_without_reference_is_refused(project: Path, tmp_path: Path):
    from components.detector.checkpoints import load_state_file, save_atomic
    from components.detector.package import MODEL_FILE

    state = load_state_file(project / "outputs" / "model" / MODEL_FILE, "nestad-model/1",
                            "model", "no model")
    state.pop("monitoring_reference")  # as a model file evaluated before monitoring existed
    save_atomic(state, tmp_path / MODEL_FILE)
    result = _monitor(project, project / "like", "--no-track", "--model", str(tmp_path))
    assert_one_line_error(result, "no monitoring reference", "nestad evaluate")


def test_a_registered_version_is_monitored_with_its_own_reference(tmp_path_factory, tmp_path):
    """``--model models:/...``: the reference travels inside the registered detector.pt."""
    from mlflow_support import DATASET, registered_project, write_params

    registered = registered_project(tmp_path_factory)
    project, version = registered.project, registered.version
    params = write_params(project, name="monitor-params.yaml")
    uri = f"models:/{version.name}/{version.version}"
    with quiet_env(tmp_path):
        result = CliRunner().invoke(get_app(), [
            "monitor", str(project.root / DATASET / "test"), "-p", str(params), "--model", uri,
            "--out", str(tmp_path / "out"), "--no-track", "-s", "monitor.min_images=2"])
    assert result.exit_code in (0, 3), result.output  # verdict aside: where the reference came from
    report = json.loads((tmp_path / "out" / "monitor.json").read_text())
    reference = json.loads((project.out / "monitoring_reference.json").read_text())
    assert report["model"] == uri and report["images"] == 12
    assert report["reference_images"] == reference["count"]
    assert report["flagged"]["threshold"] == reference["threshold"]["value"]
