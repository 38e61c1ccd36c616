"""dvc.yaml: the stage graph, and which stages a change of each parameter makes stale.

The staleness tests record a project's current state with ``dvc commit`` (placeholder
outputs, nothing trained), change one thing, and ask DVC what it would rerun. Running the
real stages is the flow tests' job (tests/test_flows.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from pipeline_support import REPO, TINY_PARAMS, make_project, pipeline_env, write_params

from components.config import load_params
from components.data import version as versioning

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
PROFILE_PARAM = "profiles.${pipeline.profile}"


def _outs(stage: dict[str, Any], kind: str = "outs") -> dict[str, dict[str, Any]]:
    """``path -> options`` of a stage's outs, metrics or plots."""
    found: dict[str, dict[str, Any]] = {}
    for entry in stage.get(kind, []):
        if isinstance(entry, str):
            found[entry] = {}
        else:
            found.update({path: opts or {} for path, opts in entry.items()})
    return found


def test_stages_run_their_components_cli_in_order():
    assert list(STAGES) == ["ingest", "validate", "train", "evaluate", "register"]
    for name, stage in STAGES.items():
        assert stage["cmd"].startswith(f"nestad {name}"), name
    dataset = "${ingest.data_root}/${ingest.name}"
    summary = "${validation.report_dir}/summary.json"
    # ingest versions the dataset through the top-level data.dvc (`dvc add`), not an out
    assert "--track" in STAGES["ingest"]["cmd"] and "outs" not in STAGES["ingest"]
    for later in ("validate", "train", "evaluate", "register"):  # the manifest identifies it
        assert f"{dataset}/manifest.csv" in STAGES[later]["deps"], later
    assert summary in STAGES["train"]["deps"]  # validation gates training
    assert "outputs/checkpoints" in STAGES["evaluate"]["deps"]
    assert {summary, "outputs/model", "outputs/metrics.json"} <= set(STAGES["register"]["deps"])
    assert "outs" not in STAGES["register"]  # never replayed from DVC's run cache


def test_metrics_and_plots_are_declared_uncached():
    assert _outs(STAGES["evaluate"], "metrics") == {"outputs/metrics.json": {"cache": False}}
    assert _outs(STAGES["evaluate"], "plots")["outputs/plots"]["cache"] is False
    assert _outs(STAGES["train"])["outputs/train_history.json"]["cache"] is False
    assert DVC_YAML["plots"][0]["losses"]["y"] == {
        "outputs/train_history.json": ["loss_g", "loss_d", "val_recon"]
    }


def test_every_declared_param_exists_and_profiled_keys_declare_the_profile():
    """A stage that applies the profile (``--profile`` in its command) and reads a key some
    profile overrides must declare the active profile, or DVC would miss a change made
    through the profile. Stages without ``--profile`` (ingest, validate) never see a
    profile's values, so a profile may override keys they read (``industrial`` sets
    ``data.layout``) without touching them."""
    params = load_params(REPO / "params.yaml")
    flat = {
        f"{section}.{key}"
        for section, values in params.model_dump(exclude={"profiles"}).items()
        for key in values
    }
    profiled = {key for overrides in params.profiles.values() for key in overrides}
    for name, stage in STAGES.items():
        declared = set(stage.get("params", []))
        assert declared - {PROFILE_PARAM} <= flat, name
        if declared & profiled and "--profile" in stage["cmd"]:
            assert PROFILE_PARAM in declared, f"{name} reads {declared & profiled}"
        if "--profile" in stage["cmd"]:
            assert "--profile ${pipeline.profile}" in stage["cmd"], name


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project whose placeholder outputs DVC recorded as up to date."""
    from dvc.repo import Repo

    base = tmp_path_factory.mktemp("dvc")
    root = make_project(base, n_train=2, n_test=1)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in pipeline_env(base).items():
            mp.setenv(key, value)
        versioning.ensure_repo(root)
        files = {
            "data/synth/manifest.csv": "path\n",
            "reports/validation/summary.json": '{"success": true}',
            "outputs/checkpoints/best.pt": "w",
            "outputs/train_history.json": "{}",
            "outputs/model/detector.pt": "m",
            "outputs/test_scores.csv": "path\n",
            "outputs/metrics.json": "{}",
            "outputs/plots/roc_pr.png": "p",
            "outputs/report/index.html": "r",
            "outputs/monitoring_reference.json": "{}",
        }
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        versioning.track_data(root, "data")  # data.dvc, as the ingest stage's command does
        with contextlib.chdir(root), Repo(str(root)) as repo:  # DVC resolves paths from cwd
            repo.commit(None, force=True)
        yield root


@pytest.mark.parametrize(
    ("changes", "stale"),
    [
        ({}, set()),  # nothing changed: nothing to run
        ({"train": {"epochs": 3}}, {"train"}),
        ({"evaluate": {"target_fpr": 0.1}}, {"evaluate"}),
        ({"registry": {"model_name": "other-detector"}}, {"register"}),
        ({"data": {"anomalous_class": "blob"}}, {"ingest", "validate", "evaluate"}),
        ({"validation": {"labels": ["gradient", "blob", "stripes", "x"]}}, {"validate"}),
        # speed and report-only knobs change no output: nothing reruns
        (
            {
                "ingest": {"workers": 2},
                "evaluate": {"batch_size": 8},
                "validation": {"examples": 3},
            },
            set(),
        ),
        # the active profile's values are tracked; another profile's are not
        (
            {"profiles": {"tiny": {"train.epochs": 2}, "other": {"train.epochs": 2}}},
            {"train", "evaluate", "register"},
        ),
        ({"profiles": {"tiny": {"train.epochs": 1}, "other": {"train.epochs": 5}}}, set()),
        # switching the pipeline's profile reruns exactly the stages that apply it
        ({"pipeline": {"profile": "other"}}, {"train", "evaluate", "register"}),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_a_change_makes_only_the_stages_that_read_it_stale(committed, changes, stale):
    try:
        write_params(committed, **changes)
        assert set(versioning.status(committed)) == stale
    finally:
        write_params(committed)


def test_the_repository_params_resolve_in_dvc_yaml(tmp_path, monkeypatch):
    """The real params.yaml fills every ${...} of dvc.yaml (the profile included)."""
    from dvc.repo import Repo

    for key, value in pipeline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        (root / name).write_text((REPO / name).read_text())
    Repo.init(str(root), no_scm=True).close()
    profile = load_params(root / "params.yaml").pipeline.profile
    with contextlib.chdir(root), Repo(str(root)) as repo:
        cmds = {stage.name: stage.cmd for stage in repo.index.stages}
    assert f"--profile {profile}" in cmds["train"]
    assert set(cmds) == set(STAGES)
    assert TINY_PARAMS["pipeline"]["profile"] in TINY_PARAMS["profiles"]


@pytest.mark.integration
def test_an_s3_source_is_the_ingest_stages_dependency(
    tmp_path, moto_endpoint, fake_aws, monkeypatch
):
    """ingest.source = s3://... on an S3-compatible server (moto on 127.0.0.1): DVC hashes
    the prefix as the stage's dependency through ingest.s3_endpoint_url, so an unchanged
    bucket reruns nothing and a new object reruns the stage."""
    import boto3

    from components.cli.stage_runner import run_nestad_command
    from components.pipeline.workflow import load_project, run_stage

    for key, value in pipeline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    root = make_project(tmp_path, n_train=4, n_test=2)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="nestad-source")
    for file in sorted((tmp_path / "source").rglob("*.png")):
        key = f"cams/{file.relative_to(tmp_path / 'source').as_posix()}"
        s3.put_object(Bucket="nestad-source", Key=key, Body=file.read_bytes())
    source = {"source": "s3://nestad-source/cams", "s3_endpoint_url": moto_endpoint}
    write_params(root, ingest={**TINY_PARAMS["ingest"], **source})
    project = load_project(root)
    versioning.ensure_repo(root)

    assert run_stage(project, "ingest", run_command=run_nestad_command) is True
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]
    assert "s3://nestad-source/cams" in {dep["path"] for dep in lock["deps"]}
    first = versioning.data_version(root)
    # the bucket is unchanged
    assert run_stage(project, "ingest", run_command=run_nestad_command) is False
    new = (tmp_path / "source" / "train" / "gradient").glob("*.png")
    s3.put_object(Bucket="nestad-source", Key="cams/train/gradient/new.png",
                  Body=_shifted_png(next(new)))
    assert run_stage(project, "ingest", run_command=run_nestad_command) is True
    assert versioning.data_version(root) != first
    assert "AWS_ENDPOINT_URL_S3" not in os.environ  # restored


def _shifted_png(path: Path) -> bytes:
    """A new, different image: ``path``'s pixels inverted."""
    import io

    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.invert(Image.open(path).convert("RGB")).save(buf, "PNG")
    return buf.getvalue()
