"""Data commands of the ``nestad`` CLI: ingest, validate, data-version, data-remote, push,
pull. ``register(app)`` adds them to the main Typer app (``components.cli``).

Relative paths in params.yaml (``ingest.source``, ``ingest.data_root``,
``validation.report_dir``) are read against the folder holding params.yaml, which is also
the DVC project root. As in every nestad command, a ``NestadError`` is one red line and
exit code 2; a dataset that fails validation exits with 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from components.cli.common import ParamsOpt, ProfileOpt, SetOpt, console, friendly_errors
from components.config import Override, Params, load_params, project_path
from components.errors import VersioningError


def _load(
    params: Path, sets: list[str] | None, profile: str | None,
    extra: list[Override] | None = None,
) -> tuple[Params, Path]:
    """The parameters and the project root (the folder holding params.yaml); ``extra``
    overrides come from options (``(label, "key=value")``, named by label in errors)."""
    return load_params(params, [*(sets or []), *(extra or [])], profile), params.absolute().parent


def _data_target(root: Path, data_root: Path) -> str:
    try:
        return data_root.relative_to(root).as_posix()
    except ValueError:
        raise VersioningError(
            f"ingest.data_root={data_root} is outside the project {root}; "
            "DVC can only track data inside it (or pass --no-track)"
        ) from None


@friendly_errors
def ingest_command(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Folder, .tar/.tar.gz/.zip, CIFAR-10 python archive or s3://bucket/prefix "
            "[default: ingest.source]."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Dataset folder under ingest.data_root [default: ingest.name]."),
    ] = None,
    track: Annotated[
        bool | None,
        typer.Option(
            "--track/--no-track",
            help="dvc add the data folder afterwards [default: ingest.track].",
            show_default=False,
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ingest images into the versioned dataset (adds only images not stored yet)."""
    from components.data.ingest import ingest
    from components.data.version import ensure_repo, track_data

    extra = [(f"--name {name}", f"ingest.name={name}")] if name else None
    p, root = _load(params, set_, profile, extra)
    source_name = None
    if source is None:
        # The manifest names the source as params.yaml does (relative to the project), so
        # the same source gives the same dataset and DVC hash wherever the project lies.
        source = source_name = p.ingest.source
        if not source.startswith("s3://"):
            source = str(project_path(root, source))
    data_root = project_path(root, p.ingest.data_root)
    target = data_root / p.ingest.name
    console.print(f"ingesting {escape(source)} -> {escape(str(target))}", highlight=False)
    report = ingest(source, p.ingest, p.data, target=target, source_name=source_name)
    added = ", ".join(f"{split} {n:,}" for split, n in report.added.items())
    totals = ", ".join(f"{split} {n:,}" for split, n in report.totals.items())
    typer.echo(
        f"read {report.seen:,} images in {report.seconds:.1f} s; added {added}; "
        f"{report.duplicates:,} already stored or repeated"
        + (f"; stored {report.masks:,} pixel masks" if report.masks else "")
    )
    typer.echo(f"dataset {report.dataset}: {totals}" + ("" if report.changed else " (unchanged)"))
    for line in report.conflicts[:5]:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if len(report.conflicts) > 5:
        console.print(f"[yellow]warning:[/] {len(report.conflicts) - 5:,} more identical copies "
                      f"(the manifest's copies column names them all)", highlight=False)
    if report.skipped:
        console.print(
            f"[yellow]warning:[/] skipped {len(report.skipped)} undecodable images, e.g. "
            f"{escape(report.skipped[0])}",
            highlight=False,
            soft_wrap=True,
        )
    if p.ingest.track if track is None else track:
        folder = _data_target(root, data_root)
        if ensure_repo(root):
            console.print(f"initialised a DVC repository in {escape(str(root))}", highlight=False)
        typer.echo(f"data version ({folder}.dvc): {track_data(root, folder)}")


@friendly_errors
def validate_command(
    dataset: Annotated[
        Path | None,
        typer.Argument(help="Ingested dataset folder [default: ingest.data_root/ingest.name]."),
    ] = None,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the JSON result and Data Docs go [default: validation.report_dir]."
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the expectation suite on a dataset; exit 1 if any expectation fails."""
    from components.data.validate import validate_dataset

    p, root = _load(params, set_, profile)
    dataset = dataset or project_path(root, p.ingest.data_root) / p.ingest.name
    report_dir = report_dir or project_path(root, p.validation.report_dir)
    report = validate_dataset(
        dataset, p.validation, p.data, report_dir=report_dir, workers=p.ingest.workers
    )
    where = f"report: {report.data_docs or report.report_dir / 'validation.json'}"
    for line in report.warnings[:5]:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if len(report.warnings) > 5:
        console.print(f"[yellow]warning:[/] {len(report.warnings) - 5:,} more identical copies "
                      "(summary.json lists them all)", highlight=False)
    if report.success:
        train, val, test = (report.counts[s] for s in ("train", "val", "test"))
        typer.secho(
            f"validation passed: {len(report.outcomes)} expectations, {report.images:,} images "
            f"(train {train['normal']:,}, val {val['normal']:,}, test {test['normal']:,} normal "
            f"+ {test['anomalous']:,} anomalous) in {report.seconds:.1f} s",
            fg=typer.colors.GREEN,
        )
        typer.echo(where)
        return
    typer.secho(
        f"validation failed: {len(report.failures)} of {len(report.outcomes)} expectations "
        f"on {report.dataset}",
        fg=typer.colors.RED,
        err=True,
    )
    for outcome in report.failures:
        typer.secho(f"  {outcome.describe()}", fg=typer.colors.RED, err=True)
    typer.echo(where, err=True)
    raise typer.Exit(1)


@friendly_errors
def data_version_command(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Print the data version: the DVC md5 of the tracked data folder."""
    from components.data.version import data_version

    p, root = _load(params, set_, None)
    typer.echo(data_version(root, _data_target(root, project_path(root, p.ingest.data_root))))


@friendly_errors
def data_remote_command(
    url: Annotated[str, typer.Argument(help="A local folder or s3://bucket/prefix.")],
    name: Annotated[str, typer.Option(help="Remote name.")] = "storage",
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible server, e.g. http://127.0.0.1:9000.")
    ] = None,
    default: Annotated[
        bool, typer.Option("--default/--no-default", help="Make it the default remote.")
    ] = True,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Configure a DVC remote (S3 credentials come from the AWS chain, never from here)."""
    from components.data.version import configure_remote, ensure_repo

    root = params.absolute().parent
    ensure_repo(root)
    configure_remote(root, url, name=name, default=default, endpoint_url=endpoint_url)
    typer.echo(f"DVC remote {name!r} -> {url}" + (" (default)" if default else ""))


@friendly_errors
def push_command(
    remote: Annotated[str | None, typer.Option(help="Remote name [default: the default].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Upload the tracked data to the DVC remote."""
    from components.data.version import push

    p, root = _load(params, set_, None)
    target = _data_target(root, project_path(root, p.ingest.data_root))
    typer.echo(f"pushed {push(root, remote, target):,} files")


@friendly_errors
def pull_command(
    remote: Annotated[str | None, typer.Option(help="Remote name [default: the default].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Download the tracked data from the DVC remote and check it out."""
    from components.data.version import pull

    p, root = _load(params, set_, None)
    stats = pull(root, remote, _data_target(root, project_path(root, p.ingest.data_root)))
    typer.echo(", ".join(f"{k} {v}" for k, v in stats.items()) or "up to date")


def register(app: typer.Typer) -> None:
    """Add the data commands to the main ``nestad`` app."""
    app.command("ingest")(ingest_command)
    app.command("validate")(validate_command)
    app.command("data-version")(data_version_command)
    app.command("data-remote")(data_remote_command)
    app.command("push")(push_command)
    app.command("pull")(pull_command)
