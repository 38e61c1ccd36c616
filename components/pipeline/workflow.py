"""The pipeline's project-level steps, shared by the Prefect flows, ``nestad run`` and the
overhead benchmark: run one DVC stage, read the validation verdict, describe the data
and the newest model's data, and apply the promotion gate. No Prefect here.

A project is a folder holding ``params.yaml`` and ``dvc.yaml``. Its layout (the DVC
stages' outputs)::

    <ingest.data_root>/<ingest.name>/   the ingested dataset (stage ``ingest``; data.dvc)
    <validation.report_dir>/            summary.json, validation.json, data_docs/
    outputs/                            the run folder (``components.pipeline``)
    mlflow.db, mlartifacts/             the embedded MLflow store, unless configured
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from components.config import Params, load_params, project_path
from components.data.version import CommandRunner
from components.decisions import DataState
from components.errors import ConfigError, NestadError, ValidationFailed, VersioningError

STAGES = ("ingest", "validate", "train", "evaluate", "register")
RUN_FOLDER = "outputs"  # the run folder dvc.yaml's stages write


@dataclass(frozen=True)
class Project:
    """A pipeline project: its root and the parameters its params.yaml holds."""

    root: Path
    params: Params

    def resolve(self, value: str) -> Path:
        """A params.yaml path, relative ones read from the project root."""
        return project_path(self.root, value)

    @property
    def dataset(self) -> Path:
        return self.resolve(self.params.ingest.data_root) / self.params.ingest.name

    @property
    def report_dir(self) -> Path:
        return self.resolve(self.params.validation.report_dir)

    @property
    def out(self) -> Path:
        return self.root / RUN_FOLDER


def load_project(root: str | Path = ".") -> Project:
    """The project at ``root``; raise ConfigError unless it has a pipeline to run."""
    root = Path(root).expanduser().resolve()
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"{root}: no dvc.yaml here; run from the nestad project folder")
    params = load_params(root / "params.yaml")
    if params.pipeline.profile is None:
        known = ", ".join(sorted(params.profiles)) or "none defined"
        raise ConfigError(
            f"{root / 'params.yaml'}: pipeline.profile is not set; the pipeline "
            f"needs a profile (known: {known})"
        )
    return Project(root, params)


def prepare(project: Project) -> bool:
    """Make the project a DVC repository if needed; True when initialised now."""
    from components.data.version import ensure_repo

    return ensure_repo(project.root)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stage_environ(project: Project) -> dict[str, str]:
    """What the stages need in the environment:

    - this environment's ``bin`` first on PATH: stage commands call ``nestad``, found even
      when the virtual environment is not activated (e.g. ``.venv/bin/nestad run``);
    - ``AWS_ENDPOINT_URL_S3`` from ``ingest.s3_endpoint_url`` for an ``s3://`` source,
      unless already set: DVC hashes the ingest stage's dependency through botocore, which
      finds an S3-compatible server there.
    """
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cfg = project.params.ingest
    if (cfg.source.startswith("s3://") and cfg.s3_endpoint_url
            and not os.environ.get("AWS_ENDPOINT_URL_S3")):
        env["AWS_ENDPOINT_URL_S3"] = cfg.s3_endpoint_url
    return env


def run_stage(project: Project, stage: str, upstream: bool = False,
              run_command: CommandRunner | None = None) -> bool:
    """``dvc repro`` one stage; True when it ran, False when DVC found it up to date. A
    failed validation raises ValidationFailed naming each failed expectation.

    The flows run the stages in pipeline order, so by default DVC checks only this stage
    (``--single-item``); ``upstream`` also reproduces any stale stage before it.

    With ``pipeline.in_process`` (the default) the stages' ``nestad`` commands run in this
    interpreter through ``run_command`` (the CLI's ``run_nestad_command``, passed in by the
    flows: the CLI sits above this module); DVC still decides, caches and records.
    Otherwise, or without a ``run_command``, each runs in its own process, exactly as
    ``dvc repro`` from a shell runs it.
    """
    from components.data.version import reproduce

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    runner = run_command if project.params.pipeline.in_process else None
    try:
        with _environ(_stage_environ(project)):
            ran = reproduce(project.root, stage, run_command=runner, single=not upstream)
    except VersioningError as exc:
        failure = validation_failure(project) if stage == "validate" else None
        if failure:
            raise ValidationFailed(failure) from exc
        raise
    return any(name == stage or name.endswith(f":{stage}") for name in ran)


def _read_summary(project: Project) -> dict[str, Any] | None:
    try:
        return json.loads((project.report_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def validation_failure(project: Project) -> str | None:
    """The failed expectations of the last validation, one per line; None if it passed or
    left no summary."""
    from components.data.validate import ExpectationOutcome

    summary = _read_summary(project)
    if not summary or summary.get("success", True):
        return None
    keys = {f.name for f in fields(ExpectationOutcome)}
    failed = [
        ExpectationOutcome(
            **(
                {k: v for k, v in o.items() if k in keys}
                | {"examples": tuple(o.get("examples") or ())}
            )
        )
        for o in summary.get("outcomes", [])
        if not o.get("success")
    ]
    docs = summary.get("data_docs") or str(project.report_dir / "validation.json")
    lines = "\n".join(f"  {outcome.describe()}" for outcome in failed)
    return (
        f"validation failed: {len(failed)} of {len(summary.get('outcomes', []))} "
        f"expectations on {summary.get('dataset')} (report: {docs}); nothing was "
        f"trained or registered\n{lines}"
    )


def _normal_train_images(counts: dict[str, Any] | None) -> int | None:
    if not counts:
        return None
    return sum(int((counts.get(split) or {}).get("normal", 0)) for split in ("train", "val"))


def data_state(project: Project) -> DataState:
    """The ingested dataset's version (the key the registry records) and normal count."""
    from components.registry.provenance import describe_data

    if not (project.dataset / "manifest.csv").is_file():
        return DataState(None, None)
    data = describe_data(str(project.dataset), project.root)
    return DataState(data.key, _normal_train_images(data.counts))


def _registry(project: Project) -> Any:
    from components.registry.client import open_registry

    return open_registry(project.params.registry, project.root)


def trained_state(project: Project) -> DataState | None:
    """The data the newest registered version was trained on; None when none exists."""
    from components.registry.lineage import lineage, list_versions

    reg = _registry(project)
    versions = list_versions(reg)
    if not versions:
        return None
    newest = versions[0]
    counts = lineage(reg, newest["version"])["data"]["counts"]
    return DataState(newest["data_version"], _normal_train_images(counts))


@dataclass(frozen=True)
class RegisteredModel:
    """A registered version and its aliases."""

    name: str
    version: str
    aliases: tuple[str, ...]
    data_version: str | None
    metrics: dict[str, float | None]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_models(project: Project) -> list[RegisteredModel]:
    """Every version of the configured model, newest first."""
    from components.registry.lineage import list_versions

    return [
        RegisteredModel(
            row["name"],
            row["version"],
            tuple(row["aliases"]),
            row["data_version"],
            dict(row["metrics"]),
        )
        for row in list_versions(_registry(project))
    ]


def newest_candidate(project: Project) -> RegisteredModel:
    """The version holding ``candidate`` (what the register stage just made)."""
    for model in registered_models(project):
        if "candidate" in model.aliases:
            return model
    raise NestadError(
        f"the register stage ran but no version of "
        f"{project.params.registry.model_name!r} holds 'candidate'"
    )


@dataclass(frozen=True)
class PromotionOutcome:
    """What the promotion gate did with one version."""

    version: str
    promoted: bool
    reason: str
    production: str | None  # the version holding ``production`` afterwards


def promote_if_better(project: Project, version: str) -> PromotionOutcome:
    """Apply the gate (``components.decisions.decide_promotion``): a version that beats
    production (or the first one) moves candidate -> staging -> production; one that does
    not keeps ``candidate``, so staging is not taken by a loser."""
    from components.decisions import PRODUCTION
    from components.registry.lineage import list_versions
    from components.registry.promote import gate_decision, promote_auto

    reg = _registry(project)
    holder = next(
        (row["version"] for row in list_versions(reg) if PRODUCTION in row["aliases"]), None
    )
    decision = gate_decision(reg, version, holder)
    if not decision.promote:
        return PromotionOutcome(version, False, decision.reason, holder)
    # The gate runs again under the promotion lock: that verdict is the one that counts.
    steps = promote_auto(reg, version, reason="training flow")
    final = steps[-1]
    return PromotionOutcome(
        version, final.promoted, final.reason, version if final.promoted else holder
    )
