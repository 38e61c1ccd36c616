"""``nestad register | models | promote | lineage | serve``: the model registry from the
command line, and the REST scorer of a registered model.

Thin glue over ``components.registry`` (imported inside each command, so ``nestad --help``
stays fast and never imports MLflow). The tracking store is the one ``params.yaml``
names (``registry.*``); see ``components.registry`` for the order of precedence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from components.cli.common import OutOpt, ParamsOpt, ProfileOpt, SetOpt, console, friendly_errors

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ReasonOpt = Annotated[
    str | None, typer.Option("--reason", help="Why; recorded in the version's transition tag.")
]


def _load(params: Path, profile: str | None, overrides: list[str] | None) -> tuple[Any, Path]:
    from components.config import load_params

    return load_params(params, overrides or [], profile), params.resolve().parent


def _registry(params: Path, profile: str | None = None, overrides: list[str] | None = None) -> Any:
    from components.registry.client import open_registry

    cfg, root = _load(params, profile, overrides)
    return open_registry(cfg.registry, root)


def _short(value: Any, n: int = 12) -> str:
    return "-" if value in (None, "") else str(value)[:n]


def _fig(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _print_steps(steps: list[Any]) -> bool:
    for step in steps:
        if step.promoted:
            replaced = f", replacing version {step.replaced}" if step.replaced else ""
            console.print(
                f"[green]version {step.version} -> {step.target}[/]{replaced}: {step.reason}",
                highlight=False,
            )
        else:
            console.print(
                f"[yellow]version {step.version} not promoted to {step.target}[/]: {step.reason}",
                highlight=False,
            )
    return all(step.promoted for step in steps)


def register_cmd(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    out: OutOpt = Path("outputs"),
    run_id: Annotated[
        str | None,
        typer.Option(help="Log into this existing MLflow run (one that tracked the training)."),
    ] = None,
    parent_run_id: Annotated[
        str | None, typer.Option(help="Parent run (e.g. a pipeline run) of the new run.")
    ] = None,
    reason: ReasonOpt = None,
    gate: Annotated[
        bool,
        typer.Option(
            "--gate",
            help="Then run the automatic gate: candidate -> staging -> production if it wins.",
        ),
    ] = False,
    export: Annotated[
        list[str] | None,
        typer.Option(
            "--export",
            help="First export and verify this format (onnx | openvino; repeatable) into "
            "OUT/export/<format>/. Exports found there are always logged with the version.",
        ),
    ] = None,
) -> None:
    """Log an evaluated run folder to MLflow and register it as the new candidate."""
    from components.registry.client import open_registry
    from components.registry.promote import promote_auto
    from components.registry.versions import register_run

    cfg, root = _load(params, profile, set_)
    for format_ in export or []:  # verified before anything is logged
        from components.cli.export import export_model

        done = export_model(str(out), format_, None, None, cfg, root)
        console.print(f"{format_} export verified on {done.report.images} images -> "
                      f"{done.folder}", highlight=False, soft_wrap=True)
    with console.status(f"logging {out} and registering {cfg.registry.model_name}"):
        version = register_run(
            cfg, root, out, run_id=run_id, parent_run_id=parent_run_id, reason=reason
        )
    metric = cfg.registry.gate_metric
    console.print(
        f"registered [bold]{version.name}[/] version {version.version} as candidate "
        f"(run {version.run_id}; data {_short(version.data_version)}; {metric} "
        f"{_fig(version.metrics.get(metric))})",
        highlight=False,
    )
    if gate:
        steps = promote_auto(open_registry(cfg.registry, root), version.version, reason)
        if not _print_steps(steps):
            raise typer.Exit(1)


def models_cmd(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the registered versions with their aliases, metrics and data versions."""
    from components.registry.lineage import list_versions

    reg = _registry(params, profile, set_)
    rows = list_versions(reg)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print(f"no versions of {reg.name!r} in {reg.uri}")
        return
    # The gate's metric first, then a few more; --json has them all.
    shown = list(
        dict.fromkeys(
            [reg.cfg.gate_metric, "leak_free.auroc", "leak_free.f1", "paper_compatible.f1"]
        )
    )
    table = Table(title=f"{reg.name} versions", caption=reg.uri)
    for col in ("version", "aliases", "created (UTC)", "data", "eval data"):
        table.add_column(col, overflow="fold")
    for metric in shown:
        protocol, name = metric.split(".", 1)
        header = f"{'leak-free' if protocol == 'leak_free' else 'paper'}\n{name}"
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["version"],
            ", ".join(row["aliases"]) or "-",
            _short(row["created"], 16).replace("T", " "),
            _short(row["data_version"], 10),
            _short(row["eval_data_version"], 10),
            *(_fig(row["metrics"].get(m)) for m in shown),
        )
    Console().print(table)


def promote_cmd(
    version: Annotated[
        str | None,
        typer.Argument(help="Version number (default: the holder of the stage before --to)."),
    ] = None,
    to: Annotated[str, typer.Option("--to", help="staging | production.")] = "production",
    auto: Annotated[
        bool,
        typer.Option(
            "--auto",
            help="The automatic gate: candidate -> staging -> production if it beats production.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Skip the stage order and the gate (recorded).")
    ] = False,
    reason: ReasonOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Move a version's alias: candidate -> staging -> production (gated).

    Exit code 1 when the gate refuses production.
    """
    from components.registry.client import RegistryError
    from components.registry.promote import promote, promote_auto

    if to not in ("staging", "production"):
        raise RegistryError(f"--to {to!r}: expected staging or production")
    reg = _registry(params, profile, set_)
    steps = (
        promote_auto(reg, version, reason)
        if auto
        else [promote(reg, to, version, force=force, reason=reason)]
    )
    if not _print_steps(steps):
        raise typer.Exit(1)


def lineage_cmd(
    model_uri: Annotated[
        str | None,
        typer.Argument(
            help="models:/<name>@<alias>, models:/<name>/<N>, a version number or an alias "
            "(default: models:/<registry.model_name>@production)."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="List every version trained or evaluated on this data hash (or prefix)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Where a model version came from, or which versions used a data version."""
    from components.registry.lineage import lineage, versions_for_data

    reg = _registry(params, profile, set_)
    if data is not None:
        rows = versions_for_data(reg, data)
        if as_json:
            _print_json(rows)
        elif not rows:
            console.print(f"no registered version was trained on data {data}")
        else:
            table = Table(title=f"versions trained on data {data}")
            for col in ("model", "version", "aliases", "matched", "data", "eval data", "created"):
                table.add_column(col, overflow="fold")
            for r in rows:
                table.add_row(
                    r["name"],
                    r["version"],
                    ", ".join(r["aliases"]) or "-",
                    ", ".join(r["matched"]),
                    _short(r["data_version"], 10),
                    _short(r["eval_data_version"], 10),
                    _short(r["created"], 16).replace("T", " "),
                )
            Console().print(table)
        return
    info = lineage(reg, model_uri or f"models:/{reg.name}@production")
    if as_json:
        _print_json(info)
        return
    _print_lineage(info)


def _validation_text(validation: dict[str, Any] | None) -> str | None:
    if not validation:
        return None
    verdict = {True: "passed", False: "FAILED"}.get(validation.get("success"), "unknown")
    if validation.get("note"):
        verdict += f" ({validation['note']})"
    if validation.get("failed"):
        verdict += f"; failed: {', '.join(validation['failed'])}"
    return verdict


def _print_lineage(info: dict[str, Any]) -> None:
    model, data, code, run = info["model"], info["data"], info["code"], info["run"]
    out = Console()
    table = Table(
        title=f"{model['name']} version {model['version']} "
        f"({', '.join(model['aliases']) or 'no alias'})",
        show_header=False,
    )
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    counts = data["counts"] or {}
    rows = [
        ("model source", model["source"]),
        ("data source", data["source"]),
        ("DVC md5", data["dvc_md5"]),
        ("manifest sha256", data["manifest_sha256"]),
        ("archive sha256", data["source_sha256"]),
        (
            "counts per split",
            ", ".join(
                f"{s}: {c.get('normal', 0)} normal / {c.get('anomalous', 0)} anomalous"
                for s, c in counts.items()
            )
            or None,
        ),
        (
            "images used",
            ", ".join(f"{k} {v}" for k, v in (data["used_counts"] or {}).items()) or None,
        ),
        ("evaluation data", data["eval_data_version"]),
        ("validation", _validation_text(info["validation"])),
        (
            "git commit",
            (code["git_commit"] or "-")
            + (" (uncommitted changes)" if code["git_dirty"] == "true" else ""),
        ),
        ("dvc.lock sha256", code["dvc_lock_sha256"]),
        (
            "run",
            f"{run['run_id']} ({run['name']}, {run['status']}, experiment {run['experiment_id']})",
        ),
        (
            "parent runs",
            " <- ".join(f"{p['run_id']} ({p['name']})" for p in info["parents"]) or None,
        ),
        ("artefacts", run["artifact_uri"]),
    ]
    for key, value in rows:
        table.add_row(key, "-" if value in (None, "") else str(value))
    for t in model["transitions"]:
        table.add_row(
            f"transition {t['seq']}",
            f"{t.get('from') or '-'} -> {t.get('to') or '-'}"
            f" by {t.get('by')} at {t.get('at')}: {t.get('why')}",
        )
    for key in (
        "leak_free.auroc",
        "leak_free.auprc",
        "leak_free.f1",
        "paper_compatible.auroc",
        "paper_compatible.auprc",
        "paper_compatible.f1",
    ):
        if key in info["metrics"]:
            table.add_row(key, _fig(info["metrics"][key]))
    out.print(table)
    params = Table(title="params", show_header=False)
    params.add_column("key", style="bold")
    params.add_column("value", overflow="fold")
    for key, value in info["params"].items():
        params.add_row(key, value)
    out.print(params)


def serve_cmd(
    model_uri: Annotated[
        str | None,
        typer.Argument(
            help="models:/<name>@<alias>, models:/<name>/<N> or a local MLflow model folder "
            "(default: models:/<registry.model_name>@production)."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(
        "--host", help="Interface to listen on (default: serve.host, 127.0.0.1); "
        "0.0.0.0 listens on every interface.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="(default: serve.port, 5000)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve a registered model over REST (POST /invocations), within serve.* limits."""
    from components.config import load_params
    from components.registry.rest import serve_model

    extra: list[Any] = list(set_ or [])
    if host is not None:
        extra.append((f"--host {host}", f"serve.host={json.dumps(host)}"))
    if port is not None:
        extra.append((f"--port {port}", f"serve.port={port}"))
    cfg = load_params(params, extra, profile)
    uri = model_uri or f"models:/{cfg.registry.model_name}@production"
    serve_model(uri, cfg, params.resolve().parent,
                lambda line: console.print(line, highlight=False, soft_wrap=True))


def register(app: typer.Typer) -> None:
    """Add the registry commands to the ``nestad`` app."""
    app.command("register")(friendly_errors(register_cmd))
    app.command("models")(friendly_errors(models_cmd))
    app.command("promote")(friendly_errors(promote_cmd))
    app.command("lineage")(friendly_errors(lineage_cmd))
    app.command("serve")(friendly_errors(serve_cmd))
