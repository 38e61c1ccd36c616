"""``nestad monitor PATH|s3://...``: a batch of new production images against the model's
validation normals. Exit 0: within every ``monitor.*`` limit; 3: drift (the line names
each limit exceeded); 2: bad input (one line, as every command)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from components.cli.common import ParamsOpt, ProfileOpt, SetOpt, _params, console, friendly_errors


def monitor_cmd(
    source: Annotated[str, typer.Argument(help="Folder, .tar/.tar.gz/.zip archive or "
                                                "s3://bucket/prefix of new images.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model file, model/ or run "
                                       "folder, or models:/<name>@<alias> | "
                                       "models:/<name>/<version>.")] = "outputs/model",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for monitor.json "
                                             "and monitor.md (default: monitor.report_dir/"
                                             "<UTC time>).")] = None,
    track: Annotated[bool | None, typer.Option("--track/--no-track", help="Log an MLflow "
                                               "run (default: monitor.track).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score new images and compare them with the model's validation normals: score
    distribution (KS test, PSI), brightness, contrast, sizes, band counts, share flagged.
    Exit code 3 past a monitor.* limit (a retraining trigger), 2 on bad input."""
    from components.config import project_path
    from components.pipeline.monitor import DRIFT_EXIT_CODE, monitor_batch

    cfg = _params(params, profile, set_)
    root = params.resolve().parent
    local = model
    if model.startswith("models:/"):
        from components.registry.download import resolve_model_uri

        local = str(resolve_model_uri(model, root))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out or project_path(root, cfg.monitor.report_dir) / stamp
    with console.status(f"monitoring {source}"):
        result = monitor_batch(cfg, source, local, out, root=root, track=track,
                               model_ref=model)
    r = result.report
    console.print(
        f"{r['images']} images: score KS p {r['score']['ks_pvalue']:.3g}, PSI "
        f"{r['score']['psi']:.3f}, flagged {r['flagged']['fraction']:.3f}, brightness shift "
        f"{r['image']['brightness']['shift']:+.1f}; report {result.json_path}"
        + (f"; MLflow run {result.run_id}" if result.run_id else ""), highlight=False)
    if result.verdict.retrain:
        console.print(f"[bold red]drift:[/] {result.verdict.reason}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(DRIFT_EXIT_CODE)
    console.print("[green]no drift[/]: every figure within its monitor.* limits")


def register(app: typer.Typer) -> None:
    """Add ``monitor`` to the ``nestad`` app."""
    app.command("monitor")(friendly_errors(monitor_cmd))
