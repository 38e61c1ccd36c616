"""Tracking and registration: what a run logs, the packaged model's round trip, failure
safety, and the whole path against a real MLflow server with S3 artefacts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow_support import (
    DATASET,
    PYTHON,
    REPO,
    Project,
    bin_path,
    dataset_test_images,
    free_port,
    git_head,
    loopback,
    new_project,
    project_template,
    quiet_env,
    read_scores,
    registered_project,
    registry_state,
    server,
    tiny_params,
    write_params,
)

from components.config import RegistryConfig, flatten_params

NAME = "nestad-detector"


def _rel(project: Project, path: Path) -> str:
    return path.relative_to(project.root / DATASET).as_posix()


# --- no registry needed -------------------------------------------------------------------


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.registry.client import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RegistryConfig()
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(cfg, tmp_path) == "http://127.0.0.1:5000"
    explicit = cfg.model_copy(update={"tracking_uri": "sqlite:////srv/mlflow.db"})
    assert tracking_uri(explicit, tmp_path) == "sqlite:////srv/mlflow.db"


def test_only_tracking_imports_mlflow_and_not_at_import_time(tmp_path: Path) -> None:
    for file in (REPO / "components").rglob("*.py"):
        if "registry" not in file.relative_to(REPO / "components").parts[:1]:
            text = file.read_text()
            assert "import mlflow" not in text and "from mlflow" not in text, file.name
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    check = (
        "import sys, components.registry.client, components.registry.runs, "
        "components.registry.pyfunc, components.registry.versions, components.registry.promote, "
        "components.registry.lineage, components.registry.download, components.cli.registry; "
        "print('mlflow' in sys.modules)"
    )
    done = subprocess.run(
        [PYTHON, "-c", check], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "False"
    assert not (tmp_path / ".config" / "mlflow").exists()  # no telemetry file written


def test_registry_config_rejects_bad_values() -> None:
    from components.config import parse_params
    from components.errors import ConfigError

    with pytest.raises(ConfigError, match="registry.gate_metric"):
        parse_params({"registry": {"gate_metric": "auroc"}})
    with pytest.raises(ConfigError, match="registry.model_name"):
        parse_params({"registry": {"model_name": "a/b"}})
    with pytest.raises(ConfigError, match="registry.gate_margin"):
        parse_params({"registry": {"gate_margin": -0.1}})


def test_data_version_of_tracked_archive_and_raw_sources(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from components.registry.provenance import describe_data, eval_data_digest

    project = new_project(tmp_path_factory, tmp_path / "p")
    data = describe_data(DATASET, project.root)
    manifest = project.root / DATASET / "manifest.csv"
    assert data.dvc_md5 == "0123456789abcdef0123456789abcdef.dir" == data.key
    assert data.manifest_sha256 == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert data.counts == {
        "train": {"normal": 12, "anomalous": 0},
        "val": {"normal": 4, "anomalous": 0},
        "test": {"normal": 6, "anomalous": 6},
    }
    archive = tmp_path / "images.tar"
    archive.write_bytes(b"not really a tar")
    assert (
        describe_data(str(archive), project.root).key
        == hashlib.sha256(b"not really a tar").hexdigest()
    )
    raw = describe_data(str(tmp_path), project.root)  # a plain folder outside data/
    assert raw.key is None

    scores = project.out / "test_scores.csv"
    digest = eval_data_digest(data, scores)
    lines = scores.read_text().splitlines()
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert eval_data_digest(data, shuffled) == digest  # row order does not matter
    relabelled = tmp_path / "relabelled.csv"
    relabelled.write_text(
        "\n".join([lines[0], lines[1].replace(",good,", ",odd,"), *lines[2:]]) + "\n"
    )
    assert eval_data_digest(data, relabelled) != digest
    assert eval_data_digest(raw, scores) is None  # unversioned data: not comparable
    # New normal training images change the data version, not the sealed test set.
    retrained = dataclasses.replace(data, dvc_md5="f" * 32 + ".dir")
    assert retrained.key != data.key
    assert eval_data_digest(retrained, scores) == digest


def test_a_bad_run_folder_is_refused_before_contacting_mlflow(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from components.registry.client import RegistryError
    from components.registry.versions import check_run_folder

    project = new_project(tmp_path_factory, tmp_path / "p")
    with pytest.raises(RegistryError, match="model:.*base_width"):
        check_run_folder(project.out, tiny_params(project.root, model={"base_width": 8}))
    (project.out / "metrics.json").unlink()
    with pytest.raises(RegistryError, match="missing metrics.json"):
        check_run_folder(project.out, project.params)


def test_an_unreachable_server_fails_fast_with_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from components.registry.client import RegistryError
    from components.registry.versions import register_run

    with quiet_env(tmp_path):
        project = new_project(tmp_path_factory, tmp_path / "p")
        params = tiny_params(
            project.root,
            registry={
                "tracking_uri": f"http://127.0.0.1:{free_port()}",
                "http_max_retries": 1,
                "http_backoff_factor": 0,
                "http_timeout_s": 5,
            },
        )
        started = time.monotonic()
        with pytest.raises(RegistryError, match=r"did not answer after 1 retries"):
            register_run(params, project.root, project.out)
        assert time.monotonic() - started < 60


# --- one registered version, tracked live through the epoch callback ------------------


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Project, Any, Any]]:
    """The session's version 1: its run tracked two epochs live, then was registered."""
    from components.registry.client import open_registry

    with quiet_env(tmp_path_factory.mktemp("tracking")):
        shared = registered_project(tmp_path_factory)
        project = shared.project
        yield project, open_registry(project.params.registry, project.root), shared.version


def test_the_run_holds_params_figures_reports_data_and_code(
    registered: tuple[Project, Any, Any],
) -> None:
    project, reg, version = registered
    client = reg.client
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    flat = flatten_params(project.params)
    assert run.data.params["train.epochs"] == str(flat["train.epochs"])
    assert set(run.data.params) == set(flat)
    metrics = json.loads((project.out / "metrics.json").read_text())
    assert run.data.metrics["leak_free.auroc"] == metrics["leak_free"]["auroc"]
    assert run.data.metrics["paper_compatible.f1"] == metrics["paper_compatible"]["f1"]
    assert "leak_free.at_target_fpr.fpr" in run.data.metrics
    assert "normalisation.score_max" in run.data.metrics
    # Logged live by the callback, not again at registration.
    assert [m.step for m in client.get_metric_history(version.run_id, "epoch.loss_g")] == [1, 2]

    artefacts = {
        a.path
        for folder in ("reports", "plots", "validation", "lineage", "report")
        for a in client.list_artifacts(version.run_id, folder)
    }
    assert {
        "report/index.html",  # the inspection page, with its pictures
        "report/images",
        "reports/metrics.json",
        "reports/train_history.json",
        "reports/test_scores.csv",
        "plots/roc_pr.png",
        "validation/summary.json",
        "lineage/lineage.json",
    } <= artefacts

    tags = run.data.tags
    head = git_head(project.root)
    assert tags["nestad.git_commit"] == head == tags["mlflow.source.git.commit"]
    assert tags["nestad.git_dirty"] == "false"
    lock = hashlib.sha256((project.root / "dvc.lock").read_bytes()).hexdigest()
    assert tags["nestad.dvc_lock_sha256"] == lock
    assert tags["nestad.validation_success"] == "true"
    inputs = {}
    for di in run.inputs.dataset_inputs:
        input_tags = {t.key: t.value for t in di.tags}
        inputs[input_tags["mlflow.data.context"]] = (di.dataset, input_tags)
    dataset, input_tags = inputs["training"]
    assert dataset.digest == version.data_version == input_tags["dvc_md5"]
    assert input_tags["manifest_sha256"] == tags["nestad.manifest_sha256"]
    assert inputs["evaluation"][1]["eval_data_version"] == version.eval_data_version


def test_the_version_is_a_candidate_with_a_complete_unpickled_model(
    registered: tuple[Project, Any, Any],
) -> None:
    _, reg, version = registered
    mv = reg.client.get_model_version_by_alias(NAME, "candidate")
    assert str(mv.version) == version.version and mv.run_id == version.run_id
    assert mv.tags["nestad.data_version"] == version.data_version
    assert mv.tags["nestad.eval_data_version"] == version.eval_data_version
    model_id = version.model_uri.removeprefix("models:/")
    files = {f.path for f in reg.client.list_logged_model_artifacts(model_id)}
    code, folders = set(), ["code/components"]  # the package and its subpackages
    while folders:
        for f in reg.client.list_logged_model_artifacts(model_id, folders.pop()):
            (folders.append if f.is_dir else code.add)(f.path)
    assert {"MLmodel", "requirements.txt", "artifacts"} <= files
    assert "code/components/detector/package.py" in code
    assert not any(p.endswith((".pkl", ".pickle")) for p in files | code)  # nothing pickled
    import mlflow

    location = reg.client.get_logged_model(model_id).artifact_location
    req = mlflow.artifacts.load_text(f"{location}/requirements.txt")
    assert "torch==2.13.0" in req.split()
    info = mlflow.models.get_model_info(version.model_uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["path", "image_b64"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == [
        "score",
        "normalised_score",
        "is_anomaly",
        "map_png",  # only with params {"maps": true}
    ]


def test_the_packaged_model_gives_the_evaluation_scores_in_a_fresh_process(
    registered: tuple[Project, Any, Any], tmp_path: Path
) -> None:
    """Loaded by MLflow in a new process, from its own packaged code only."""
    from components.pipeline.stages import score_paths
    from components.registry.download import resolve_model_uri
    from components.registry.serve import encode_image

    project, _, _ = registered
    images = dataset_test_images(project.root)
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps({"path": [str(p) for p in images], "b64": [encode_image(p) for p in images[:3]]})
    )
    script = textwrap.dedent(f"""
        import json, sys
        import mlflow, pandas as pd
        req = json.load(open({str(request)!r}))
        model = mlflow.pyfunc.load_model("models:/{NAME}@candidate")
        by_path = model.predict(pd.DataFrame({{"path": req["path"]}}))
        by_b64 = model.predict(pd.DataFrame({{"image_b64": req["b64"]}}))
        print(json.dumps({{"path": by_path.to_dict("list"), "b64": by_b64.to_dict("list"),
                          "code": sys.modules["components.detector.package"].__file__}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = project.uri
    done = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/components/detector/package.py" in got["code"]  # not this checkout's copy

    expected = score_paths(
        resolve_model_uri(f"models:/{NAME}@candidate", project.root), images, None
    )
    assert got["path"]["score"] == [r["score"] for r in expected]  # exactly
    assert got["path"]["normalised_score"] == [r["normalised_score"] for r in expected]
    assert got["path"]["is_anomaly"] == [r["is_anomaly"] for r in expected]
    assert got["b64"]["score"] == got["path"]["score"][:3]
    evaluation = read_scores(project.out / "test_scores.csv")  # written with 6 digits
    for image, score, normed, flagged in zip(images, *got["path"].values(), strict=True):
        ev_score, ev_normed, ev_flagged = evaluation[_rel(project, image)]
        assert score == pytest.approx(ev_score, rel=1e-5)
        assert normed == pytest.approx(ev_normed, abs=1e-6)
        assert flagged == ev_flagged


def test_score_command_takes_a_registered_model(
    registered: tuple[Project, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csv

    from typer.testing import CliRunner

    from components.cli.app import get_app

    project, _, _ = registered
    monkeypatch.chdir(project.root)  # its params.yaml (defaults) names ./mlflow.db
    out = tmp_path / "scores.csv"
    done = CliRunner().invoke(
        get_app(),
        [
            "score",
            "--model",
            f"models:/{NAME}@candidate",
            str(project.root / DATASET / "test"),
            "--output",
            str(out),
        ],
    )
    assert done.exit_code == 0, done.output
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    evaluation = read_scores(project.out / "test_scores.csv")
    assert len(rows) == len(evaluation) == 12
    for row in rows:
        ev_score, _, ev_flagged = evaluation[_rel(project, Path(row["path"]))]
        assert float(row["score"]) == pytest.approx(ev_score, rel=1e-5)
        assert (row["is_anomaly"] == "True") == ev_flagged
    done = CliRunner().invoke(
        get_app(),
        ["score", "--model", f"models:/{NAME}@nope", str(project.root / DATASET / "test")],
    )
    assert done.exit_code == 2 and "no version of 'nestad-detector' holds alias 'nope'" in (
        done.output
    )
    done = CliRunner().invoke(get_app(), ["register", "--out", str(tmp_path / "nothing")])
    assert done.exit_code == 2 and "not an evaluated run folder" in done.output


# --- failure safety -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "model_name", "lost_answer"),
    [
        ("log_artifact", NAME, False),  # before the model is logged: the run fails, no version
        ("set_registered_model_alias", NAME, False),  # the version exists: it is deleted again
        ("set_registered_model_alias", "brand-new", False),  # ...and so is a model made for it
        ("create_model_version", NAME, True),  # created, but the answer never came back
    ],
)
def test_a_failure_mid_registration_leaves_the_registry_as_it_was(
    registered: tuple[Project, Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    model_name: str,
    lost_answer: bool,
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.registry.client import RegistryError
    from components.registry.versions import register_run

    project, reg, _ = registered
    before = registry_state(reg.client)
    runs_before = {
        r.info.run_id
        for r in reg.client.search_runs([reg.client.get_experiment_by_name("nestad").experiment_id])
    }

    original = getattr(MlflowClient, where)

    def fail(*args: Any, **kwargs: Any) -> None:
        if lost_answer:
            original(*args, **kwargs)
        raise MlflowException(f"injected failure in {where}")

    monkeypatch.setattr(MlflowClient, where, fail)
    params = tiny_params(project.root, registry={"model_name": model_name})
    with pytest.raises(RegistryError, match=f"injected failure in {where}"):
        register_run(params, project.root, project.out)
    monkeypatch.undo()
    assert registry_state(reg.client) == before
    new = [
        r
        for r in reg.client.search_runs([reg.client.get_experiment_by_name("nestad").experiment_id])
        if r.info.run_id not in runs_before
    ]
    assert len(new) == 1
    assert new[0].info.status == ("FAILED" if where == "log_artifact" else "FINISHED")


# --- the real thing: an MLflow server with S3 artefacts -------------------------------


@pytest.mark.integration
def test_real_server_register_promote_score_lineage(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    import boto3
    from typer.testing import CliRunner

    from components.cli.app import get_app
    from components.config import load_params
    from components.pipeline.stages import score_paths
    from components.registry.client import RegistryError, open_registry
    from components.registry.download import resolve_model_uri
    from components.registry.lineage import lineage, list_versions
    from components.registry.provenance import describe_data

    with quiet_env(tmp_path) as env:
        project = new_project(tmp_path_factory, tmp_path / "project")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.setenv(key, "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3_port, port = free_port(), free_port()
        s3_url = f"http://127.0.0.1:{s3_port}"
        env.setenv("MLFLOW_S3_ENDPOINT_URL", s3_url)
        backend = tmp_path / "server.db"  # already migrated: starts in seconds
        shutil.copy(project_template(tmp_path_factory) / "mlflow.db", backend)
        with server(
            [bin_path("moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], f"{s3_url}/moto-api/"
        ):
            s3 = boto3.client("s3", endpoint_url=s3_url)
            s3.create_bucket(Bucket="mlflow")
            mlflow_server = server(
                [
                    bin_path("mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{backend}",
                    "--artifacts-destination",
                    "s3://mlflow/artifacts",
                    *loopback(port),
                ],
                f"http://127.0.0.1:{port}/health",
            )
            with mlflow_server:
                uri = f"http://127.0.0.1:{port}"
                params_file = write_params(
                    project, tracking_uri=uri, http_max_retries=1, http_backoff_factor=0
                )
                done = CliRunner().invoke(
                    get_app(),
                    ["register", "-p", str(params_file), "--out", str(project.out), "--gate"],
                )
                assert done.exit_code == 0, done.output
                assert "-> production" in done.output
                reg = open_registry(load_params(params_file).registry, project.root)
                version = reg.client.get_model_version_by_alias(NAME, "production")
                assert (
                    version.tags["nestad.data_version"] == describe_data(DATASET, project.root).key
                )

                detector = resolve_model_uri(f"models:/{NAME}@production", project.root)
                rows = score_paths(detector, dataset_test_images(project.root), None)
                evaluation = read_scores(project.out / "test_scores.csv")
                for image, row in zip(dataset_test_images(project.root), rows, strict=True):
                    assert row["score"] == pytest.approx(
                        evaluation[_rel(project, image)][0], rel=1e-5
                    )
                info = lineage(reg, f"models:/{NAME}@production")
                assert info["data"]["dvc_md5"] == version.tags["nestad.dvc_md5"]
                assert info["model"]["aliases"] == ["production"]
                assert info["run"]["artifact_uri"].startswith("mlflow-artifacts:")
                keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]]
                assert any(k.endswith("artifacts/detector.pt") for k in keys)
                assert any(k.endswith("reports/metrics.json") for k in keys)
            # The server is gone: bounded retries, then one clear error.
            with pytest.raises(RegistryError, match="did not answer after 1 retries"):
                list_versions(reg)
