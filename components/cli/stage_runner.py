"""Running a DVC stage's ``nestad ...`` command in this interpreter (``pipeline.in_process``):
the pipeline passes this to DVC, so a stage saves an interpreter start and the heavy imports."""

from __future__ import annotations

import contextlib
import shlex
import sys
import traceback
from pathlib import Path

_SHELL_OPERATORS = set("();<>|&")


def run_nestad_command(cmd: str, cwd: Path) -> int | None:
    """Run a stage's ``nestad ...`` command line in this process, in ``cwd``; its exit
    status. None for anything else (another program, or shell syntax: pipes, ``&&``,
    redirections, ``$VARIABLES``), which DVC then runs in a shell.

    As in a child process, an unexpected exception prints its traceback and gives status 1;
    a ``NestadError`` gives the CLI's one-line message and status 2.
    """
    if "$" in cmd or "`" in cmd:
        return None
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    argv = list(lexer)
    if not argv or argv[0] != "nestad" or any(set(a) <= _SHELL_OPERATORS for a in argv):
        return None
    from components.cli.app import get_app

    with contextlib.chdir(cwd):
        try:
            get_app()(args=argv[1:], prog_name="nestad")
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            print(exc.code, file=sys.stderr)
            return 1
        except Exception:  # noqa: BLE001 - a crashed command fails its stage, as in a shell
            traceback.print_exc()
            return 1
    return 0
