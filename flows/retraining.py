"""The retraining flow, meant for a schedule: retrain when new normal images arrive.

It ingests the configured source incrementally (DVC stage ``ingest``; with an unchanged
source DVC skips it), compares the dataset with the data the newest registered model was
trained on, and applies ``components.decisions.decide_retraining``. When that says so it
runs the training flow, whose last step promotes the new version only if the gate finds
it better; otherwise the run finishes in the state "Nothing new".
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from components.decisions import DataState, RetrainDecision, decide_retraining
from components.pipeline.workflow import Project, data_state, load_project, trained_state
from flows.training import IO_RETRIES, TrainingReport, ingest, training_flow


@dataclass(frozen=True)
class RetrainingReport:
    """The decision and, when it retrained, what the training flow did."""

    decision: RetrainDecision
    current: DataState
    trained: DataState | None
    training: TrainingReport | None = None


@task(name="describe-data", cache_policy=NO_CACHE)
def describe_current(project: Project) -> DataState:
    """The ingested dataset's version and normal training image count."""
    return data_state(project)


@task(name="newest-model-data", **IO_RETRIES)
def describe_trained(project: Project) -> DataState | None:
    """The data the newest registered model was trained on (None: no model yet)."""
    return trained_state(project)


@task(name="decide-retraining", cache_policy=NO_CACHE)
def decide(current: DataState, trained: DataState | None, min_new: int) -> RetrainDecision:
    """Whether the new data warrants a training run."""
    return decide_retraining(current, trained, min_new)


@flow(name="retraining", log_prints=True)
def retraining_flow(project: str = ".") -> RetrainingReport | State:
    """Ingest new images; retrain (and maybe promote) only if new normal data arrived."""
    proj = load_project(project)
    ingest(proj)
    current, trained = describe_current(proj), describe_trained(proj)
    decision = decide(current, trained, proj.params.pipeline.min_new_normal_images)
    print(f"{'retraining' if decision.retrain else 'not retraining'}: {decision.reason}")
    if not decision.retrain:
        report = RetrainingReport(decision, current, trained)
        return Completed(name="Nothing new", message=decision.reason, data=report)
    return RetrainingReport(decision, current, trained, training_flow(str(proj.root)))
