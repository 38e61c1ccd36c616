"""Run ``nestad`` commands with a fault hook that ends them by SIGKILL.

    python sigkill_driver.py MARKER KILL nestad-args...     one command, in this process
    python sigkill_driver.py --serve                        a fork server (below)

``--serve`` imports nestad, torch and MLflow once (seconds on a loaded machine), then
forks a child per request: JSON lines on stdin, ``{"run": {"marker", "kill", "args",
"cwd", "env", "log"}}`` answers ``{"pid": N}`` at once (the child runs the command, its
output in ``log``); ``{"wait": N}`` answers ``{"status": S}`` when child N has ended
(S: its exit code, or minus the signal that killed it). Nothing runs on another thread, so
forking is safe. ``KILL`` names where the command dies:

``none``                      no hook: the command runs to its end
``pause-step:K``              training: after optimiser step K (counted over the whole run,
                              resumes included), write ``paused K`` to MARKER and wait; the
                              test then sends SIGKILL from outside
``save-mid:K``                training: die half-way through writing the first ``last.pt``
                              whose run has reached step K (half a temp file on disk)
``save-replace:K``            training: the same ``last.pt``, fully written to its temp file,
                              die just before the rename over ``last.pt``
``store:K``                   ingest: die half-way through writing the K-th stored image
``swap``                      ingest: die right after the first rename of the swap
``cleanup``                   ingest: die when the replaced version is being removed
``after:METHOD`` / ``before:METHOD``   registry: die right after (before) the first call
                              of ``MlflowClient.METHOD``
``call:K``                    registry: die right after the K-th ``MlflowClient`` call
                              (``call:0``: never; MARKER counts the calls)
``locked``                    promotion: die while holding the promotion lock

Self-inflicted kills are ``os.kill(os.getpid(), SIGKILL)``: no ``finally`` block, no
``atexit`` handler, no flush runs, exactly as when the kernel or an operator kills it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

PAUSE_LIMIT_S = 600.0  # a paused run nobody kills ends by itself (exit 3)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL cannot be caught


def note(marker: Path, text: str) -> None:
    """Replace MARKER's content atomically, so a poller never reads half a line."""
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, marker)


def _hook_training(kind: str, k: int, marker: Path) -> None:
    import torch

    import components.detector.checkpoints as checkpoints
    import components.detector.train as train

    done = {"step": 0}
    step = train.GanTrainer.step

    def counted_step(self: Any, x: Any) -> Any:
        losses = step(self, x)
        # the step schedule counts optimiser steps over the run (restored on resume);
        # fit steps it right after this call
        done["step"] = self.sched_g.last_epoch + 1
        if kind == "pause-step" and done["step"] == k:
            note(marker, f"paused {k}")
            time.sleep(PAUSE_LIMIT_S)
            sys.exit(3)
        return losses

    train.GanTrainer.step = counted_step
    save, replace = torch.save, os.replace

    def due(obj: Any) -> bool:
        return isinstance(obj, dict) and "opt_g" in obj and obj["history"][-1]["steps"] >= k

    def hooked_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if kind == "save-mid" and due(obj):
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            note(marker, "dying in save")
            die()
        if kind == "save-replace" and due(obj):
            hooked_replace.armed = True  # type: ignore[attr-defined]
        save(obj, f, *args, **kwargs)

    def hooked_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(hooked_replace, "armed", False) and Path(dst).name == "last.pt":
            note(marker, "dying before replace")
            die()
        replace(src, dst, *args, **kwargs)

    torch.save = hooked_save
    checkpoints.os.replace = hooked_replace  # the os module: this process only


def _hook_ingest(kind: str, k: int, marker: Path) -> None:
    import shutil

    import components.data.ingest as ingest
    import components.data.probing as probing

    write_new, rename, rmtree = probing._write_new, os.rename, shutil.rmtree
    stored = {"n": 0}

    def hooked_write(path: str, data: bytes) -> None:
        stored["n"] += 1
        if kind == "store" and stored["n"] == k:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
            note(marker, f"dying in store {k}")
            die()
        write_new(path, data)

    probing._write_new = hooked_write
    swap = ingest._swap

    def hooked_swap(staging: Path, target: Path) -> None:
        def first_rename(*args: Any, **kwargs: Any) -> Any:
            result = rename(*args, **kwargs)
            note(marker, "dying in swap")
            die()
            return result

        def removing(path: Any, *args: Any, **kwargs: Any) -> Any:
            if kind == "cleanup":
                note(marker, "dying in cleanup")
                die()
            return rmtree(path, *args, **kwargs)

        if kind == "swap":
            ingest.os.rename = first_rename
            exchange = getattr(ingest, "_exchange", None)
            if exchange is not None:  # the atomic exchange counts as the first rename
                ingest._exchange = lambda a, b: (exchange(a, b), note(marker, "dying in swap"),
                                                 die())[0]
        ingest.shutil.rmtree = removing
        swap(staging, target)

    ingest._swap = hooked_swap


def _hook_registry(kind: str, arg: str, marker: Path) -> None:
    from mlflow import MlflowClient

    calls = {"n": 0}
    for name in dir(MlflowClient):
        method = getattr(MlflowClient, name)
        if name.startswith("_") or not callable(method) or isinstance(method, type):
            continue

        def wrapped(*args: Any, __name: str = name, __method: Any = method, **kwargs: Any) -> Any:
            if kind == "before" and __name == arg:
                note(marker, f"dying before {__name}")
                die()
            result = __method(*args, **kwargs)
            calls["n"] += 1
            if kind == "call" and arg == "0":  # count only
                note(marker, f"calls {calls['n']}")
            if (kind == "after" and __name == arg) or (kind == "call" and calls["n"] == int(arg)):
                note(marker, f"dying after {__name} (call {calls['n']})")
                die()
            return result

        setattr(MlflowClient, name, wrapped)


def _hook_promotion(marker: Path) -> None:
    import components.registry.promote as promote

    def locked(*args: Any, **kwargs: Any) -> Any:
        note(marker, "dying while holding the lock")
        die()

    promote._promote_locked = locked


def _run(marker: Path, kill: str, args: list[str]) -> None:
    kind, _, arg = kill.partition(":")
    if kind in ("pause-step", "save-mid", "save-replace"):
        _hook_training(kind, int(arg), marker)
    elif kind in ("store", "swap", "cleanup"):
        _hook_ingest(kind, int(arg or 0), marker)
    elif kind in ("after", "before", "call"):
        _hook_registry(kind, arg, marker)
    elif kind == "locked":
        _hook_promotion(marker)
    elif kind != "none":
        raise SystemExit(f"unknown kill point {kill!r}")
    from components.cli.app import get_app

    sys.argv = ["nestad", *args]
    get_app()()


def _child(request: dict[str, Any]) -> None:
    """In the forked child: output to the log, the test's environment, run, exit."""
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    code = 0
    try:
        _run(Path(request["marker"]), request["kill"], request["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it, exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The fork server: import once, fork a child per request (see the module docstring)."""
    import torch._dynamo  # noqa: F401 - torch.optim imports it on first use (seconds)
    import torch.fx.experimental.optimization  # noqa: F401 - the scorer's BN folding

    import components.cli.app  # noqa: F401 - everything the commands import lazily
    import components.data.ingest  # noqa: F401
    import components.pipeline.stages  # noqa: F401
    import components.registry.promote  # noqa: F401
    import components.registry.pyfunc  # noqa: F401
    import components.registry.versions  # noqa: F401

    try:  # MLflow maps modules to packages once per process (seconds): do it before forking
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()
    except (ImportError, AttributeError):
        pass
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                _child(request["run"])
            answer: dict[str, Any] = {"pid": pid}
        else:
            _, status = os.waitpid(request["wait"], 0)
            answer = {"status": os.waitstatus_to_exitcode(status)}
        print(json.dumps(answer), flush=True)


def main(argv: list[str]) -> None:
    if argv == ["--serve"]:
        serve()
    else:
        _run(Path(argv[0]), argv[1], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
