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
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
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
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: the last finished epoch is kept; "
                          "continue with --resume")
            raise typer.Exit(130) from None

    return wrapper


def _params(params: Path, profile: str | None, overrides: list[str] | None):
    from components.config import load_params

    return load_params(params, overrides or [], profile)
