"""``nestad export`` on an evaluated run folder (checked on its validation images),
``nestad score --backend`` giving the same CSV with every backend, a failed check as one
line with nothing written, and ``register`` carrying the exports into the registry."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from cli_support import assert_one_line_error
from mlflow_support import DATASET, new_project, quiet_env, write_params
from typer.testing import CliRunner

from components.cli.app import get_app

NAME = "nestad-detector"


def _invoke(*args: object):
    return CliRunner().invoke(get_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """An evaluated project (params.yaml, its manifest dataset) with both exports."""
    tmp = tmp_path_factory.mktemp("export-cli")
    with quiet_env(tmp), pytest.MonkeyPatch.context() as mp:
        project = new_project(tmp_path_factory, tmp / "project")
        params = write_params(project)
        mp.chdir(project.root)
        for backend in ("onnx", "openvino"):
            done = _invoke("export", project.out, "--format", backend, "-p", params)
            assert done.exit_code == 0, done.output
            assert f"{backend} export verified" in done.output
        yield project


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_export_is_checked_on_the_validation_images(project) -> None:
    for backend in ("onnx", "openvino"):
        meta = json.loads((project.out / "export" / backend / "metadata.json").read_text())
        eq = meta["equivalence"]
        assert eq["passed"] and eq["images"] == 4  # the template's 4 validation normals
        assert eq["images_from"] == f"4 validation images of {project.root / DATASET}"
        assert meta["data_version"] == "0123456789abcdef0123456789abcdef.dir"  # data.dvc
        assert meta["model"]["version"] is None
        assert meta["model"]["source"] == str(project.out.resolve())


def test_score_backends_write_the_same_csv(project, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project.root)
    test_dir = project.root / DATASET / "test"
    tables = {}
    for backend, model in (("torch", project.out / "model"), ("onnx", project.out),
                           ("openvino", project.out / "export" / "openvino")):
        out = tmp_path / f"{backend}.csv"
        done = _invoke("score", test_dir, "--model", model, "--backend", backend,
                       "--output", out, "--threshold", "fpr")
        assert done.exit_code == 0, done.output
        tables[backend] = _rows(out)
    columns, torch_rows = tables["torch"]
    assert columns == ["path", "score", "normalised_score", "is_anomaly"]
    assert len(torch_rows) == 12
    for backend in ("onnx", "openvino"):
        cols, rows = tables[backend]
        assert cols == columns
        assert [r["path"] for r in rows] == [r["path"] for r in torch_rows]
        assert [r["is_anomaly"] for r in rows] == [r["is_anomaly"] for r in torch_rows]
        for mine, ref in zip(rows, torch_rows, strict=True):
            assert float(mine["normalised_score"]) == pytest.approx(
                float(ref["normalised_score"]), abs=1e-4)
            assert float(mine["score"]) == pytest.approx(float(ref["score"]), rel=1e-4)


def test_score_backend_errors_are_one_line(project, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project.root)
    test_dir = project.root / DATASET / "test"
    done = _invoke("score", test_dir, "--model", project.out, "--backend", "tensorrt")
    assert_one_line_error(done, "--backend", "tensorrt")
    bare = tmp_path / "run"
    shutil.copytree(project.out / "model", bare / "model")
    done = _invoke("score", test_dir, "--model", bare, "--backend", "onnx")
    assert_one_line_error(done, "no onnx export", "nestad export")


def test_a_failed_check_is_one_line_and_writes_nothing(
    project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.export.graph import ExportGraph

    original = ExportGraph.forward
    monkeypatch.setattr(ExportGraph, "forward",
                        lambda self, image: tuple(t * 1.01 if t.is_floating_point() else t
                                                  for t in original(self, image)))
    monkeypatch.chdir(project.root)
    out = tmp_path / "exports" / "onnx"
    done = _invoke("export", project.out, "--format", "onnx", "--out", out)
    assert_one_line_error(done, "disagrees with PyTorch", "nothing written")
    assert not out.exists() and list(out.parent.iterdir()) == []
    done = _invoke("export", project.out, "--format", "tflite", "--out", out)
    assert_one_line_error(done, "--format", "tflite")


def test_register_carries_the_exports(project, tmp_path_factory,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from components.registry.client import RegistryError, open_registry
    from components.registry.versions import register_run

    tmp = tmp_path_factory.mktemp("export-register")
    with quiet_env(tmp):
        fresh = new_project(tmp_path_factory, tmp / "project")
        shutil.copytree(project.out / "export", fresh.out / "export")
        version = register_run(fresh.params, fresh.root, fresh.out)
        reg = open_registry(fresh.params.registry, fresh.root)
        model_id = version.model_uri.removeprefix("models:/")
        found, pending = set(), [""]
        while pending:
            for info in reg.client.list_logged_model_artifacts(model_id, pending.pop() or None):
                (pending.append if info.is_dir else found.add)(info.path)
        assert {"artifacts/export/onnx/model.onnx", "artifacts/export/onnx/metadata.json",
                "artifacts/export/openvino/model.xml", "artifacts/export/openvino/model.bin",
                "artifacts/export/openvino/metadata.json"} <= found
        tags = reg.client.get_model_version(NAME, version.version).tags
        assert json.loads(tags["nestad.export.onnx"])["file"] == "model.onnx"

        # the registered version scores with its own export, as the run folder does
        write_params(fresh)
        monkeypatch.chdir(fresh.root)
        test_dir = fresh.root / DATASET / "test"
        outs = {}
        for model in (f"models:/{NAME}/{version.version}", fresh.out):
            outs[model] = fresh.root / f"{len(outs)}.csv"
            done = _invoke("score", test_dir, "--model", model, "--backend", "onnx",
                           "--output", outs[model])
            assert done.exit_code == 0, done.output
        first, second = (_rows(p) for p in outs.values())
        assert first == second

        # a registered model exports too, and its metadata names the version
        uri = f"models:/{NAME}/{version.version}"
        done = _invoke("export", uri, "--format", "onnx", "--out", fresh.root / "line")
        assert done.exit_code == 0, done.output
        meta = json.loads((fresh.root / "line" / "metadata.json").read_text())
        assert meta["model"]["version"] == f"{NAME}/{version.version}"
        assert meta["model"]["source"] == uri
        assert meta["data_version"] == version.data_version
        done = _invoke("export", uri, "--format", "onnx")
        assert_one_line_error(done, "--out is needed for a registered model")

        # a stale export (the model re-evaluated since) is refused before anything is logged
        versions_before = len(reg.client.search_model_versions(f"name='{NAME}'"))
        meta_file = fresh.out / "export" / "onnx" / "metadata.json"
        meta = json.loads(meta_file.read_text())
        meta["model"]["sha256"] = "0" * 64
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(RegistryError, match="exported from another detector.pt"):
            register_run(fresh.params, fresh.root, fresh.out)
        assert len(reg.client.search_model_versions(f"name='{NAME}'")) == versions_before


def test_register_can_export_first(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.registry.client import open_registry

    tmp = tmp_path_factory.mktemp("register-export")
    with quiet_env(tmp):
        fresh = new_project(tmp_path_factory, tmp / "project")
        params = write_params(fresh)
        monkeypatch.chdir(fresh.root)
        done = _invoke("register", "-p", params, "--out", fresh.out, "--export", "tflite")
        assert_one_line_error(done, "--format 'tflite'")
        reg = open_registry(fresh.params.registry, fresh.root)
        assert reg.client.search_model_versions(f"name='{NAME}'") == []  # nothing registered
        done = _invoke("register", "-p", params, "--out", fresh.out, "--export", "onnx")
        assert done.exit_code == 0, done.output
        assert "onnx export verified on 4 images" in done.output
        meta = json.loads((fresh.out / "export" / "onnx" / "metadata.json").read_text())
        (version,) = reg.client.search_model_versions(f"name='{NAME}'")
        model_id = str(version.source).removeprefix("models:/")
        logged = reg.client.list_logged_model_artifacts(model_id, "artifacts/export/onnx")
        assert {Path(a.path).name for a in logged} == {"model.onnx", "metadata.json"}
        assert json.loads(version.tags["nestad.export.onnx"])["sha256"] == (
            meta["files"]["model.onnx"])
