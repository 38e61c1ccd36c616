"""What every ``nestad`` command shares: the console, the ``--params/--profile/--set/--out``
options, and ``friendly_errors`` (a ``NestadError`` becomes one red line and exit code 2,
never a traceback)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from components.errors import NestadError

console = Console(stderr=True)


def _error_exit(message: str) -> typer.Exit:
    """Print ``message`` as the CLI's one red error line; the exit (code 2) to raise."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _check_params_file(ctx: typer.Context, param: typer.CallbackParam, value: Path) -> Path:
    """A ``-p/--params`` file typed on the command line must exist (``load_params`` reads a
    missing default ``params.yaml`` as all defaults; a named one that is missing is a typo,
    never a silent run on the built-in defaults)."""
    source = ctx.get_parameter_source(param.name or "params")
    if ctx.resilient_parsing or getattr(source, "name", None) != "COMMANDLINE":
        return value  # the default params.yaml (typer ships its own click: compare by name)
    if not value.exists():
        raise _error_exit(f"--params {value}: no such file")
    if not value.is_file():
        raise _error_exit(f"--params {value}: not a file")
    return value


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.",
                                         callback=_check_params_file)]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="Profile from params.yaml: quick | paper | industrial | industrial_quick.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key, e.g. -s train.epochs=2 (repeatable)."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run folder for checkpoints, model, "
                                                          "metrics and plots.")]


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print a NestadError as one clear line and exit 2; leave everything else alone."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NestadError as exc:
            raise _error_exit(str(exc)) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: the last finished epoch is kept; "
                          "continue with --resume")
            raise typer.Exit(130) from None

    return wrapper


def _params(params: Path, profile: str | None, overrides: list[str] | None):
    from components.config import load_params

    return load_params(params, overrides or [], profile)
