"""The retraining flow, meant for a schedule: retrain when new normal images arrive.

It ingests the configured source incrementally (DVC stage ``ingest``; with an unchanged
source DVC skips it), compares the dataset with the data the newest registered model was
trained on, and applies ``components.decisions.decide_retraining``. When that says so it
runs the training flow, whose last step promotes the new version only if the gate finds
it better; otherwise the run finishes in the state "Nothing new".

``monitor_report``: a ``nestad monitor`` report (``monitor.json``) as a trigger. Its
verdict, judged again with this project's ``monitor.*`` limits, goes to
``decide_retraining_on_drift``: drift retrains on as little as one new normal image; drift
with no new normal image ends in the state "Drift, no new data".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from components.decisions import (
    DataState,
    DriftVerdict,
    RetrainDecision,
    decide_retraining_on_drift,
)
from components.pipeline.workflow import Project, data_state, load_project, trained_state
from flows.training import IO_RETRIES, TrainingReport, ingest, training_flow


@dataclass(frozen=True)
class RetrainingReport:
    """The decision and, when it retrained, what the training flow did."""

    decision: RetrainDecision
    current: DataState
    trained: DataState | None
    training: TrainingReport | None = None
    drift: DriftVerdict | None = None


@task(name="describe-data", cache_policy=NO_CACHE)
def describe_current(project: Project) -> DataState:
    """The ingested dataset's version and normal training image count."""
    return data_state(project)


@task(name="newest-model-data", **IO_RETRIES)
def describe_trained(project: Project) -> DataState | None:
    """The data the newest registered model was trained on (None: no model yet)."""
    return trained_state(project)


@task(name="read-monitoring-verdict", cache_policy=NO_CACHE)
def read_drift(project: Project, report: str) -> DriftVerdict:
    """A monitoring report's verdict under this project's ``monitor.*`` limits."""
    from components.pipeline.monitor import read_verdict

    return read_verdict(Path(report), project.params)


@task(name="decide-retraining", cache_policy=NO_CACHE)
def decide(current: DataState, trained: DataState | None, min_new: int,
           drift: DriftVerdict | None = None) -> RetrainDecision:
    """Whether the new data (and a monitoring verdict) warrant a training run."""
    return decide_retraining_on_drift(current, trained, min_new, drift)


@flow(name="retraining", log_prints=True)
def retraining_flow(project: str = ".", monitor_report: str | None = None
                    ) -> RetrainingReport | State:
    """Ingest new images; retrain (and maybe promote) only if new normal data arrived,
    or drift was found (``monitor_report``) and any new normal image arrived."""
    proj = load_project(project)
    drift = read_drift(proj, monitor_report) if monitor_report else None
    ingest(proj)
    current, trained = describe_current(proj), describe_trained(proj)
    decision = decide(current, trained, proj.params.pipeline.min_new_normal_images, drift)
    print(f"{'retraining' if decision.retrain else 'not retraining'}: {decision.reason}")
    if not decision.retrain:
        report = RetrainingReport(decision, current, trained, drift=drift)
        name = "Drift, no new data" if drift is not None and drift.retrain else "Nothing new"
        return Completed(name=name, message=decision.reason, data=report)
    return RetrainingReport(decision, current, trained, training_flow(str(proj.root)), drift)
