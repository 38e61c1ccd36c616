"""Lineage both ways: from a model version to its data, code, params and runs, and from a
data version to every model version trained on it; plus ``nestad models``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow_support import (
    DATASET,
    Registered,
    git_head,
    quiet_env,
    registered_project,
    write_params,
)
from typer.testing import CliRunner

from components.cli.app import get_app
from components.config import flatten_params

URI = "models:/nestad-detector@candidate"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registered, Any]]:
    from components.registry.client import open_registry

    with quiet_env(tmp_path_factory.mktemp("lineage")):
        shared = registered_project(tmp_path_factory)
        project = shared.project
        write_params(project)
        yield shared, open_registry(project.params.registry, project.root)


def test_lineage_of_a_version(shared: tuple[Registered, Any]) -> None:
    from components.registry.lineage import lineage

    registered, reg = shared
    project, version = registered.project, registered.version
    info = lineage(reg, URI)
    assert info["model"]["version"] == version.version and "candidate" in info["model"]["aliases"]
    assert info["model"]["transitions"][0]["to"] == "candidate"
    data = info["data"]
    manifest = project.root / DATASET / "manifest.csv"
    assert data["dvc_md5"] == data["data_version"] == "0123456789abcdef0123456789abcdef.dir"
    assert data["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert data["source"] == str(project.root / DATASET)
    assert data["counts"]["test"] == {"normal": 6, "anomalous": 6}
    assert data["used_counts"] == {
        "train": 12,
        "val": 4,
        "val_normal": 4,
        "test_normal": 6,
        "test_anomalous": 6,
    }
    assert data["eval_data_version"] == version.eval_data_version
    assert {i["tags"]["mlflow.data.context"] for i in data["inputs"]} == {"training", "evaluation"}
    assert info["validation"]["success"] is True
    head = git_head(project.root)
    assert info["code"]["git_commit"] == head and info["code"]["dvc_lock_sha256"]
    assert info["params"]["model.base_width"] == str(
        flatten_params(project.params)["model.base_width"]
    )
    assert info["metrics"]["leak_free.auroc"] == version.metrics["leak_free.auroc"]
    assert info["run"]["run_id"] == version.run_id and info["run"]["status"] == "FINISHED"
    assert [p["run_id"] for p in info["parents"]] == [registered.parent_run_id]
    assert info["parents"][0]["name"] == "pipeline"
    # The same version by number and by models:/<name>/<N>.
    assert lineage(reg, version.version)["run"] == info["run"]
    assert lineage(reg, f"models:/nestad-detector/{version.version}")["run"] == info["run"]


def test_versions_trained_on_a_data_version(shared: tuple[Registered, Any]) -> None:
    from components.registry.client import RegistryError
    from components.registry.lineage import versions_for_data

    registered, reg = shared
    version = registered.version
    by_dvc = {
        (r["name"], r["version"]): r for r in versions_for_data(reg, version.data_version[:10])
    }
    assert by_dvc[("nestad-detector", version.version)]["matched"] == ["data_version", "dvc_md5"]
    assert all(r["dvc_md5"] == version.data_version for r in by_dvc.values())
    manifest = registered.project.root / DATASET / "manifest.csv"
    by_manifest = versions_for_data(reg, hashlib.sha256(manifest.read_bytes()).hexdigest())
    assert ("nestad-detector", version.version) in {(r["name"], r["version"]) for r in by_manifest}
    assert {tuple(r["matched"]) for r in by_manifest} == {("manifest_sha256",)}
    assert versions_for_data(reg, "9a9a9a9a9a") == []
    with pytest.raises(RegistryError, match="at least 6 characters"):
        versions_for_data(reg, "0123")


def test_unknown_versions_and_aliases_are_named(shared: tuple[Registered, Any]) -> None:
    from components.registry.client import RegistryError
    from components.registry.lineage import lineage

    _, reg = shared
    with pytest.raises(RegistryError, match="holds alias 'gone'"):
        lineage(reg, "models:/nestad-detector@gone")
    with pytest.raises(RegistryError, match="has no version 99"):
        lineage(reg, "models:/nestad-detector/99")
    with pytest.raises(RegistryError, match="expected models:/<name>@<alias>"):
        lineage(reg, "models:/nestad-detector")


def test_lineage_and_models_commands(shared: tuple[Registered, Any]) -> None:
    registered, _ = shared
    params = str(registered.project.root / "params.yaml")
    runner = CliRunner(env={"COLUMNS": "200"})  # wide enough for whole table cells
    done = runner.invoke(get_app(), ["lineage", URI, "--json", "-p", params])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["data"]["dvc_md5"] == registered.version.data_version
    done = runner.invoke(get_app(), ["lineage", URI, "-p", params])
    assert done.exit_code == 0, done.output
    for heading in (
        "DVC md5",
        "manifest sha256",
        "counts per split",
        "validation",
        "git commit",
        "parent runs",
        "transition 001",
        "leak_free.auroc",
        "model.base_width",
    ):
        assert heading in done.stdout
    data = registered.version.data_version
    done = runner.invoke(get_app(), ["lineage", "--data", data, "--json", "-p", params])
    assert ("nestad-detector", "1") in {(r["name"], r["version"]) for r in json.loads(done.stdout)}
    done = runner.invoke(get_app(), ["lineage", "--data", data, "-p", params])
    assert done.exit_code == 0 and f"versions trained on data {data}" in done.stdout
    done = runner.invoke(get_app(), ["models", "--json", "-p", params])
    rows = json.loads(done.stdout)
    assert rows[-1]["version"] == "1" and "candidate" in rows[-1]["aliases"]
    assert rows[-1]["data_version"] == registered.version.data_version
    assert rows[-1]["metrics"]["leak_free.auroc"] == registered.version.metrics["leak_free.auroc"]
    done = runner.invoke(get_app(), ["models", "-p", params])
    assert done.exit_code == 0 and "candidate" in done.stdout
