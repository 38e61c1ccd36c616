"""The Prefect flows end to end on a tiny synthetic project (real DVC stages, real
``nestad`` stage commands, an embedded MLflow store), under Prefect's test harness.

One project is trained once per module (``trained``); tests that change it work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow_support import bin_path, free_port, server
from pipeline_support import NORMAL, add_images, make_project, pipeline_env
from typer.testing import CliRunner

from components.data import version as versioning
from components.decisions import decide_promotion
from components.errors import ValidationFailed
from components.pipeline.workflow import Project, load_project, registered_models


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A temporary Prefect API and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=240):
            yield


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """DVC, MLflow and caches inside tmp; no tracking URI from outside."""
    base = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in pipeline_env(base).items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield base


@dataclass(frozen=True)
class Trained:
    base: Path  # holds project/ and source/
    root: Path
    report: Any  # flows.training.TrainingReport


@pytest.fixture(scope="module")
def trained(prefect_harness: Any, quiet: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny project after one full training flow."""
    from flows.training import training_flow

    base = tmp_path_factory.mktemp("trained")
    root = make_project(base)
    return Trained(base, root, training_flow(str(root)))


def _copy(trained: Trained, dest: Path) -> Project:
    """A copy of the trained project and its source (the MLflow store comes along)."""
    shutil.copytree(trained.base, dest, symlinks=True)
    return load_project(dest / "project")


def _versions(project: Project) -> dict[str, tuple[str, ...]]:
    return {m.version: m.aliases for m in registered_models(project)}


def _lock(project: Project) -> dict[str, Any]:
    return yaml.safe_load((project.root / "dvc.lock").read_text())["stages"]


def test_training_flow_registers_the_first_model_and_promotes_it(trained):
    report, project = trained.report, load_project(trained.root)
    assert report.ran == dict.fromkeys(
        ("ingest", "validate", "train", "evaluate", "register"), True
    )
    assert report.registered.version == "1"
    assert "candidate" in report.registered.aliases  # as registered
    assert report.promotion.promoted and "no production version yet" in report.promotion.reason
    assert _versions(project) == {"1": ("production",)}  # candidate -> staging -> production
    assert set(_lock(project)) == {"ingest", "validate", "train", "evaluate", "register"}
    assert json.loads((project.out / "metrics.json").read_text())["leak_free"]["auroc"] >= 0
    assert (project.report_dir / "data_docs" / "index.html").is_file()
    assert report.registered.data_version == _data_version(project)
    # The data version is data.dvc's md5 (the ingest stage's `dvc add`); the run keeps
    # dvc.lock, every stage's dependencies and outputs.
    from components.registry.client import open_registry

    data_dvc = yaml.safe_load((project.root / "data.dvc").read_text())
    assert report.registered.data_version == data_dvc["outs"][0]["md5"]
    assert report.registered.data_version.endswith(".dir")
    reg = open_registry(project.params.registry, project.root)
    run_id = reg.client.get_model_version(reg.name, "1").run_id
    assert "lineage/dvc.lock" in [a.path for a in reg.client.list_artifacts(run_id, "lineage")]


def _data_version(project: Project) -> str:
    from components.pipeline.workflow import data_state

    return data_state(project).version


def test_rerun_with_nothing_changed_runs_no_stage_and_registers_nothing(trained):
    """Also the main-job command: `nestad run` says where everything is."""
    from flows.cli import get_app

    project = load_project(trained.root)
    lock = _lock(project)
    result = CliRunner().invoke(get_app(), ["run", "--project", str(trained.root)])
    assert result.exit_code == 0, result.output
    for expected in (
        "nothing new registered",
        "models:/nestad-detector@production = version 1",
        "metrics.json",
        "data_docs/index.html",
        "mlflow ui",
        "Prefect UI",
    ):
        assert expected in result.output
    assert _versions(project) == {"1": ("production",)}
    assert _lock(project) == lock and versioning.status(project.root) == {}


def test_nothing_new_in_the_source_ends_the_retraining_flow_as_nothing_new(trained):
    from flows.retraining import retraining_flow

    state = retraining_flow(str(trained.root), return_state=True)
    assert state.is_completed() and state.name == "Nothing new"
    assert "nothing new" in state.message
    assert state.result().training is None
    assert _versions(load_project(trained.root)) == {"1": ("production",)}


def test_a_drift_report_with_nothing_new_ends_as_drift_no_new_data(trained, tmp_path):
    """The monitoring verdict reaches the decision; drift alone, with no new normal image,
    retrains nothing (the old data cannot teach the new kind of images)."""
    from components.detector.drift import REPORT_FORMAT
    from flows.retraining import retraining_flow

    report = tmp_path / "monitor.json"
    report.write_text(json.dumps({
        "format": REPORT_FORMAT, "score": {"ks_pvalue": 1e-9, "psi": 3.0},
        "flagged": {"fraction": 0.0},
        "image": {"brightness": {"shift": 80.0}, "contrast": {"change": 0.0},
                  "size_mismatch": 0.0, "channel_mismatch": 0.0}}))
    state = retraining_flow(str(trained.root), monitor_report=str(report), return_state=True)
    assert state.is_completed() and state.name == "Drift, no new data"
    assert "monitoring found drift" in state.message and "brightness shift" in state.message
    assert state.result().drift.exceeded == ("min_ks_pvalue", "max_psi",
                                             "max_brightness_shift")
    assert _versions(load_project(trained.root)) == {"1": ("production",)}


def test_new_normal_images_retrain_and_promote_only_if_the_gate_allows(trained, tmp_path):
    from components.registry.client import open_registry
    from components.registry.promote import version_figures
    from flows.retraining import retraining_flow

    project = _copy(trained, tmp_path / "copy")
    before = _data_version(project)
    add_images(tmp_path / "copy" / "source", NORMAL[0], 6, start=100)
    report = retraining_flow(str(project.root))

    assert report.decision.retrain and report.decision.new_normal_images > 0
    assert report.current.version != before == report.trained.version
    training = report.training
    assert training.ran["ingest"] is False  # the retraining flow's own ingest brought it in
    assert all(training.ran[s] for s in ("validate", "train", "evaluate", "register"))
    assert training.registered.version == "2"
    assert training.registered.data_version == report.current.version
    # Promoted exactly when the gate says so (here it compares against version 1).
    reg, cfg = open_registry(project.params.registry, project.root), project.params.registry
    gate = decide_promotion(
        version_figures(reg, "2"),
        version_figures(reg, "1"),
        cfg.gate_metric,
        cfg.gate_margin,
        cfg.gate_higher_is_better,
    )
    assert training.promotion.promoted is gate.promote
    assert _versions(project) == (
        {"2": ("production",), "1": ()}
        if gate.promote
        else {"2": ("candidate",), "1": ("production",)}
    )
    # The newest model now matches the data: the next run finds nothing new.
    again = retraining_flow(str(project.root), return_state=True)
    assert again.name == "Nothing new" and len(_versions(project)) == 2


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "process-per-stage"])
def test_failing_validation_stops_the_flow_before_training(trained, tmp_path, in_process):
    """Whether the stages' commands run in the flow's process or each in its own."""
    from flows.training import training_flow

    project = _copy(trained, tmp_path / "copy")
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["pipeline"]["in_process"] = in_process
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    lock = _lock(project)
    add_images(tmp_path / "copy" / "source", NORMAL[1], 2, size=12, tag="small")  # < 16 px
    state = training_flow(str(project.root), return_state=True)

    assert state.is_failed()
    assert "width_at_least_min" in state.message  # the failure is visible on the flow run
    with pytest.raises(ValidationFailed, match=r"validation failed: .*\n.*width_at_least_min"):
        state.result()
    new_lock = _lock(project)
    assert new_lock["ingest"] != lock["ingest"]  # the new images were ingested ...
    assert {s: new_lock[s] for s in ("validate", "train", "evaluate")} == {
        s: lock[s] for s in ("validate", "train", "evaluate")
    }  # ... nothing after ran
    assert _versions(project) == {"1": ("production",)}  # production stays


def test_schedule_without_a_prefect_server_explains_how_to_run_one(trained):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import get_app

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(
            get_app(), ["schedule", "--cron", "0 3 * * *", "--project", str(trained.root)]
        )
    assert result.exit_code == 2
    assert "no Prefect server is configured" in result.output
    assert "prefect server start" in result.output and "PREFECT_API_URL" in result.output
    bad = CliRunner().invoke(
        get_app(), ["schedule", "--cron", "61 * * * *", "--project", str(trained.root)]
    )
    assert bad.exit_code == 2 and "Invalid cron string" in bad.output


@pytest.mark.integration
def test_flows_run_and_schedule_against_a_real_prefect_server(trained, tmp_path, monkeypatch):
    """`prefect server start` on 127.0.0.1: flow runs are recorded there, and `nestad
    schedule` serves the retraining flow as a cron deployment."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retraining import retraining_flow
    from flows.training import training_flow

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    args = [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with server(args, f"{url}/health", timeout=180), temporary_settings({PREFECT_API_URL: url}):
        training = training_flow(str(trained.root), return_state=True)
        retraining = retraining_flow(str(trained.root), return_state=True)
        assert training.is_completed() and retraining.name == "Nothing new"
        with get_client(sync_client=True) as client:
            runs = {r.id: r for r in client.read_flow_runs()}
            assert runs[training.state_details.flow_run_id].state.is_completed()
            assert runs[retraining.state_details.flow_run_id].state.name == "Nothing new"

        env = {**os.environ, "PREFECT_API_URL": url}
        proc = subprocess.Popen(
            [bin_path("nestad"), "schedule", "--cron", "0 3 * * *", "--project", str(trained.root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            schedules = _wait_for_deployment(url, proc, "retraining/scheduled")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        assert [s.schedule.cron for s in schedules] == ["0 3 * * *"]


def _wait_for_deployment(
    url: str, proc: subprocess.Popen, name: str, timeout: float = 120
) -> list[Any]:
    """The schedules of deployment ``flow/deployment`` once the serve process made it."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"nestad schedule exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                return client.read_deployment_by_name(name).schedules
            except Exception:  # noqa: BLE001 - not created yet
                time.sleep(0.5)
    pytest.fail(f"deployment {name} did not appear on {url} in {timeout}s")
