"""The ``nestad`` console script: the components' commands plus the flows' own.

``run`` is the main job: the training flow end to end, then where everything is.
``schedule`` serves the retraining flow on a cron schedule against a Prefect server.
These live here, with the flows, so that no component imports Prefect. Prefect and the
flows are imported inside the commands, so ``nestad --help`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from components.cli.app import get_app as components_app
from components.cli.common import console, friendly_errors
from components.errors import NestadError

ProjectOpt = Annotated[
    Path, typer.Option("--project", help="Project folder holding params.yaml and dvc.yaml.")
]
SERVER_HELP = (
    "Prefect runs cron schedules only with a running Prefect server; its embedded mode "
    "(no PREFECT_API_URL) cannot schedule. Start one and point nestad at it:\n"
    "  prefect server start --host 127.0.0.1 --port 4200     # keep it running\n"
    "  prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api\n"
    "then run this command again (it serves the retraining flow until stopped), or deploy\n"
    "prefect.yaml to a process work pool and start a worker (README, 'Workflow')."
)


# Set unless the user chose otherwise: no telemetry (these machines have no internet), and
# time for the embedded server's first start (migrations) on a slow or busy machine.
_PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def _prefect_env() -> None:
    for key, value in _PREFECT_ENV.items():
        os.environ.setdefault(key, value)


def _mlflow_ui(project: Any) -> str:
    from components.registry.client import tracking_uri

    uri = tracking_uri(project.params.registry, project.root)
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"


def _prefect_ui() -> str:
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return settings.ui_url or settings.api.url
    return (
        "embedded server; its runs stay in $PREFECT_HOME/prefect.db: `prefect server "
        "start` shows them at http://127.0.0.1:4200"
    )


def _figure(project: Any) -> str:
    try:
        metrics = json.loads((project.out / "metrics.json").read_text())
        return f" (leak-free AUROC {metrics['leak_free']['auroc']:.4f})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _print_where(project: Any, report: Any) -> None:
    """Where the model, metrics, plots, Data Docs and the UIs are."""
    from components.pipeline.workflow import registered_models

    lines = []
    if report.registered is not None:
        model, outcome = report.registered, report.promotion
        state = (
            "promoted to production" if outcome and outcome.promoted else "candidate (not promoted)"
        )
        lines.append(
            f"registered model: {model.uri} -- {state}: {outcome.reason if outcome else '-'}"
        )
    else:
        lines.append("registered model: nothing changed, nothing new registered")
    versions = registered_models(project)
    production = next((m for m in versions if "production" in m.aliases), None)
    name = project.params.registry.model_name
    lines.append(
        "production:       "
        + (
            f"models:/{name}@production = version {production.version}"
            if production
            else "none yet"
        )
    )
    if production:
        lines.append(f"score images:     nestad score --model models:/{name}@production IMAGES...")
    docs = project.report_dir / "data_docs" / "index.html"
    lines += [
        f"metrics:          {project.out / 'metrics.json'}{_figure(project)}",
        f"plots:            {project.out / 'plots'}  (and `dvc plots show` for the losses)",
        f"report:           {project.out / 'report' / 'index.html'}  (open in a browser)",
        f"Data Docs:        {docs if docs.is_file() else project.report_dir}",
        f"MLflow UI:        {_mlflow_ui(project)}",
        f"Prefect UI:       {_prefect_ui()}",
    ]
    typer.echo("\n".join(lines))


@friendly_errors
def run_cmd(
    project: ProjectOpt = Path("."),
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help="Set pipeline.profile in params.yaml first (e.g. paper on a GPU), "
            "so DVC sees the change.",
        ),
    ] = None,
) -> None:
    """Run the training flow: ingest, validate, train, evaluate, register, promote."""
    from components.config import set_pipeline_profile
    from components.pipeline.workflow import load_project

    if profile is not None and set_pipeline_profile(project / "params.yaml", profile):
        console.print(f"params.yaml: pipeline.profile is now {profile!r}")
    proj = load_project(project)
    console.print(
        f"running the training flow on {proj.root} (profile {proj.params.pipeline.profile!r})"
    )
    _prefect_env()
    from flows.training import training_flow

    try:
        report = training_flow(str(proj.root))
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        raise NestadError(
            f"{exc} Raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or "
            "start `prefect server start` and set PREFECT_API_URL"
        ) from None
    _print_where(proj, report)


def _check_server() -> str:
    """The configured Prefect API URL; NestadError if none is configured or it is down."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise NestadError(f"no Prefect server is configured.\n{SERVER_HELP}")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise NestadError(
            f"the Prefect server at {url} does not answer ({error}); start it "
            "with `prefect server start` or fix PREFECT_API_URL"
        )
    return url


@friendly_errors
def schedule_cmd(
    cron: Annotated[
        str, typer.Option("--cron", help='Cron expression, e.g. "0 3 * * *" (every day at 03:00).')
    ],
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron expression.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    project: ProjectOpt = Path("."),
) -> None:
    """Serve the retraining flow on a cron schedule (needs a Prefect server)."""
    from pydantic import ValidationError

    from components.pipeline.workflow import load_project

    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        raise NestadError(
            f"--cron {cron!r} / --timezone {timezone!r}: "
            f"{exc.errors()[0]['msg'].removeprefix('Value error, ')}"
        ) from None
    proj = load_project(project)
    _prefect_env()
    url = _check_server()
    from flows.retraining import retraining_flow

    console.print(
        f"serving the retraining flow of {proj.root} on '{cron}' ({timezone}) "
        f"against {url}; stop with Ctrl-C (the schedule is then paused)"
    )
    from prefect.schedules import Cron

    retraining_flow.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"project": str(proj.root)},
        description=f"nestad retraining of {proj.root}",
    )


def register(app: typer.Typer) -> None:
    """Add the flow commands to the ``nestad`` app."""
    app.command("run")(run_cmd)
    app.command("schedule")(schedule_cmd)
    from components.cli.batch import set_batch_scorer

    set_batch_scorer(_score_in_parallel)  # `nestad score --workers N | s3://...`


def _score_in_parallel(sources: list[str], model: Path, output: Path | None,
                       threshold: str | None, workers: int, address: str | None,
                       chunk_size: int) -> Any:
    """The batch scoring flow on Dask (imported only when a parallel score is asked for)."""
    _prefect_env()
    from flows.scoring import score_in_parallel

    return score_in_parallel(sources, model, output, threshold, workers, address, chunk_size)


_registered: list[bool] = []


def get_app() -> typer.Typer:
    """Every ``nestad`` command: the components' (``components.cli``) and the flows'."""
    app = components_app()
    if not _registered:
        register(app)
        _registered.append(True)
    return app


def main() -> None:
    get_app()()
