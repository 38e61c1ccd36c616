"""The training flow: ingest -> validate -> train -> evaluate -> register -> promote.

Each step is a Prefect task that reproduces its DVC stage (``dvc.yaml``): DVC decides
what is stale, caches the outputs and records ``dvc.lock``; Prefect orchestrates, retries
the I/O-bound steps (reading the source, talking to the tracking server) and shows each
step's state. A stage DVC finds up to date costs milliseconds, so rerunning the flow on
unchanged data and params does nothing and registers nothing.

A failed validation fails its task with every failed expectation in the message; the
flow stops there, before training, and nothing is registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.cli.stage_runner import run_nestad_command
from components.pipeline.workflow import (
    Project,
    PromotionOutcome,
    RegisteredModel,
    load_project,
    newest_candidate,
    prepare,
    promote_if_better,
    run_stage,
)

# DVC is the cache: Prefect must run every task (inputs are a small Project anyway).
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 10, "cache_policy": NO_CACHE}
LOCAL = {"cache_policy": NO_CACHE}


def _reproduce(project: Project, stage: str) -> bool:
    """``run_stage`` with the stages' ``nestad`` commands run in this interpreter (unless
    ``pipeline.in_process`` is false)."""
    return run_stage(project, stage, run_command=run_nestad_command)


@dataclass(frozen=True)
class TrainingReport:
    """What one training flow run did."""

    project: Path
    ran: dict[str, bool] = field(default_factory=dict)  # stage -> ran (False: up to date)
    registered: RegisteredModel | None = None  # None: nothing changed, nothing registered
    promotion: PromotionOutcome | None = None


@task(name="ingest", **IO_RETRIES)
def ingest(project: Project) -> bool:
    """Add the source's new images to the versioned dataset (DVC stage ``ingest``)."""
    prepare(project)
    return _reproduce(project, "ingest")


@task(name="validate", **LOCAL)
def validate(project: Project) -> bool:
    """Run the expectation suite; fails, naming each failed expectation, on bad data."""
    return _reproduce(project, "validate")


@task(name="train", **LOCAL)
def train(project: Project) -> bool:
    """Train on the normal images; keep the epoch chosen on validation normals.

    With ``train.distributed.nproc_per_node`` set, the stage's ``nestad train`` starts
    torchrun as a subprocess (``components.cli.torchrun``), never ``multiprocessing``
    here: Prefect loads flow code under another module name, which spawned or forked
    children cannot import."""
    return _reproduce(project, "train")


@task(name="evaluate", **LOCAL)
def evaluate(project: Project) -> bool:
    """Fit normalisation and thresholds on validation normals; score the test split."""
    return _reproduce(project, "evaluate")


@task(name="register", **IO_RETRIES)
def register(project: Project) -> RegisteredModel | None:
    """Register the evaluated model as ``candidate``; None when DVC found it registered."""
    return newest_candidate(project) if _reproduce(project, "register") else None


@task(name="promote-if-better", **IO_RETRIES)
def promote(project: Project, model: RegisteredModel) -> PromotionOutcome:
    """Move the candidate to production only if the gate finds it better."""
    return promote_if_better(project, model.version)


@flow(name="training", log_prints=True)
def training_flow(project: str = ".") -> TrainingReport:
    """The whole workflow on the project at ``project`` (a folder with dvc.yaml)."""
    proj = load_project(project)
    ran = {
        "ingest": ingest(proj),
        "validate": validate(proj),
        "train": train(proj),
        "evaluate": evaluate(proj),
    }
    model = register(proj)
    ran["register"] = model is not None
    if model is None:
        print("every stage was up to date: nothing registered, nothing to promote")
        return TrainingReport(proj.root, ran)
    outcome = promote(proj, model)
    verdict = "promoted to production" if outcome.promoted else "kept as candidate"
    print(f"{model.name} version {model.version} {verdict}: {outcome.reason}")
    return TrainingReport(proj.root, ran, model, outcome)
