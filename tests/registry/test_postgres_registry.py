"""The shared registry: MLflow on a real PostgreSQL server with artefacts on S3 (moto).

One throw-away PostgreSQL cluster on 127.0.0.1 (``postgres_support``) holds the store;
``mlflow server`` runs on it with ``--artifacts-destination s3://...``. Against that server:
train (live per-epoch tracking) -> register -> promote -> two racing promotions ->
lineage -> REST scoring (``mlflow models serve``). Then the same database straight from a
client (``registry.tracking_uri: postgresql://...``, artefacts ``s3://``), no server.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mlflow_support import (
    bin_path,
    dataset_test_images,
    free_port,
    loopback,
    new_project,
    quiet_env,
    race_gated_promotions,
    tiny_params,
    write_params,
)
from postgres_support import postgres_server
from server_support import logged_server

from components.decisions import CANDIDATE, PRODUCTION
from components.registry.client import _retry

NAME = "nestad-detector"


def _rival(reg: Any, base: Any, value: float) -> str:
    """Another version of ``base``'s logged model whose run holds gate metric ``value``
    on the same evaluation data (what a second pipeline would register)."""
    from mlflow.entities import Metric

    client = reg.client
    run = client.create_run(client.get_run(base.run_id).info.experiment_id)
    client.log_batch(run.info.run_id, metrics=[Metric(reg.cfg.gate_metric, value, 0, 0)])
    client.set_terminated(run.info.run_id)
    tags = {"nestad.eval_data_version": base.tags["nestad.eval_data_version"]}
    return str(client.create_model_version(NAME, base.source, run_id=run.info.run_id,
                                           tags=tags,
                                           model_id=base.source.removeprefix("models:/")).version)


def _race(reg: Any, versions: list[str]) -> list[Any]:
    """Two pipelines at once, each taking ``candidate`` for its version and running the
    gate; retried while the other holds ``candidate``."""
    return race_gated_promotions(
        reg, versions,
        lambda version: _retry(  # as register_run takes it: a concurrent write retried
            lambda: reg.client.set_registered_model_alias(NAME, CANDIDATE, version)),
        reason="racing pipeline")


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def test_a_bare_postgresql_uri_names_the_installed_driver(tmp_path: Path) -> None:
    from components.config import RegistryConfig
    from components.registry.client import tracking_uri

    cfg = RegistryConfig(tracking_uri="postgresql://u@db:5432/mlflow")
    assert tracking_uri(cfg, tmp_path) == "postgresql+psycopg2://u@db:5432/mlflow"
    explicit = RegistryConfig(tracking_uri="postgresql+psycopg://u@db/mlflow")
    assert tracking_uri(explicit, tmp_path) == "postgresql+psycopg://u@db/mlflow"
    import psycopg2  # noqa: F401 - the driver that URI names is installed


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_postgres_store_with_s3_artifacts_end_to_end(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    import boto3

    from components.pipeline.stages import evaluate_stage, score_paths, train_stage
    from components.registry.client import RegistryError, open_registry
    from components.registry.download import resolve_model_uri
    from components.registry.lineage import lineage, list_versions
    from components.registry.promote import promote_auto
    from components.registry.runs import epoch_logger, start_run
    from components.registry.serve import encode_image
    from components.registry.versions import register_run

    with postgres_server() as db_uri, quiet_env(tmp_path) as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(key, value)
        s3_port, port = free_port(), free_port()
        s3_url = f"http://127.0.0.1:{s3_port}"
        env.setenv("MLFLOW_S3_ENDPOINT_URL", s3_url)
        project = new_project(tmp_path_factory, tmp_path / "project")
        with logged_server([bin_path("moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                           f"{s3_url}/moto-api/", tmp_path / "moto.log"):
            s3 = boto3.client("s3", endpoint_url=s3_url)
            s3.create_bucket(Bucket="mlflow")
            mlflow_server = logged_server(
                # SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3: name psycopg2
                [bin_path("mlflow"), "server", "--backend-store-uri",
                 db_uri.replace("postgresql://", "postgresql+psycopg2://"),
                 "--artifacts-destination", "s3://mlflow/served", *loopback(port)],
                f"http://127.0.0.1:{port}/health", tmp_path / "mlflow-server.log",
            )
            with mlflow_server:
                uri = f"http://127.0.0.1:{port}"
                params = tiny_params(project.root, registry={"tracking_uri": uri})
                reg = open_registry(params.registry, project.root)

                # train (epochs tracked live on the server) -> evaluate -> register
                out = project.root / "trained"
                run_id = start_run(reg, params, "train")
                train_stage(params, out, on_epoch=epoch_logger(reg, run_id))
                evaluate_stage(params, out)
                history = reg.client.get_metric_history(run_id, "epoch.loss_g")
                assert len(history) == params.train.epochs
                first = register_run(params, project.root, out, run_id=run_id)
                assert reg.client.get_model_version_by_alias(NAME, CANDIDATE).version == \
                    first.version

                # promote: the first version passes the gate
                steps = promote_auto(reg)
                assert steps[-1].promoted
                base = reg.client.get_model_version_by_alias(NAME, PRODUCTION)
                assert str(base.version) == str(first.version)

                # two racing promotions: one production, the better one, none replaced twice
                value = float(first.metrics[params.registry.gate_metric])
                rivals = {_rival(reg, base, value + 0.1): value + 0.1,
                          _rival(reg, base, value + 0.2): value + 0.2}
                results = _race(reg, list(rivals))
                promoted = [r for r in results if r.target == PRODUCTION and r.promoted]
                best = max(rivals, key=rivals.get)
                assert str(reg.client.get_model_version_by_alias(NAME, PRODUCTION).version) \
                    == best
                replaced = [r.replaced for r in promoted]
                assert len(replaced) == len(set(replaced))
                holders = [v for v in list_versions(reg) if PRODUCTION in v["aliases"]]
                assert [str(v["version"]) for v in holders] == [best]

                # lineage: the production version's data and run, artefacts on S3
                info = lineage(reg, f"models:/{NAME}/{first.version}")
                tags = reg.client.get_model_version(NAME, first.version).tags
                assert info["data"]["dvc_md5"] == tags["nestad.dvc_md5"]
                assert info["run"]["run_id"] == run_id
                assert info["run"]["artifact_uri"].startswith("mlflow-artifacts:")
                keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]]
                assert any(k.startswith("served/") and k.endswith("detector.pt") for k in keys)

                # REST scoring of the production model, served from the registry
                env.setenv("MLFLOW_TRACKING_URI", uri)
                detector = resolve_model_uri(f"models:/{NAME}@production", project.root)
                images = dataset_test_images(project.root)
                expected = score_paths(detector, images, None)
                serve_port = free_port()
                with logged_server([bin_path("mlflow"), "models", "serve", "-m",
                                    f"models:/{NAME}@production", "--env-manager", "local",
                                    *loopback(serve_port)],
                                   f"http://127.0.0.1:{serve_port}/ping",
                                   tmp_path / "serve.log"):
                    body = _post(f"http://127.0.0.1:{serve_port}", {"dataframe_split": {
                        "columns": ["image_b64"], "data": [[encode_image(p)] for p in images]}})
                assert [p["score"] for p in body["predictions"]] == pytest.approx(
                    [r["score"] for r in expected], rel=1e-6)
                env.delenv("MLFLOW_TRACKING_URI")

            # the same database without a server: registry.tracking_uri: postgresql://...
            direct = tiny_params(project.root, registry={
                "tracking_uri": db_uri, "experiment": "nestad-direct",
                "artifact_location": "s3://mlflow/direct"})
            version = register_run(direct, project.root, out)
            dreg = open_registry(direct.registry, project.root)
            seen = {str(v["version"]) for v in list_versions(dreg)}
            assert {str(first.version), *rivals, str(version.version)} <= seen
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow",
                                                          Prefix="direct/")["Contents"]]
            assert any(k.endswith("reports/metrics.json") for k in keys)
            nowhere = tiny_params(project.root, registry={"tracking_uri": db_uri,
                                                          "experiment": "no-artifact-store"})
            with pytest.raises(RegistryError, match="set registry.artifact_location"):
                register_run(nowhere, project.root, out)
            write_params(project, tracking_uri=db_uri)  # what resolve_model_uri reads
            local = resolve_model_uri(f"models:/{NAME}/{version.version}", project.root)
            assert score_paths(local, images, None)[0]["score"] == pytest.approx(
                score_paths(out / "model", images, None)[0]["score"], rel=1e-6)
