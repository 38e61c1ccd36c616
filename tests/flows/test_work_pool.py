"""A real Prefect server, a process work pool and a worker: ``prefect deploy`` of
prefect.yaml's ``training-process`` deployment, a run triggered through the API, the worker
running the training flow on a tiny project, the model registered; the worker stopped."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow_support import bin_path, free_port
from pipeline_support import REPO, make_project, pipeline_env
from server_support import logged_server

POOL = "nestad-test-process"
# `prefect worker start`, with SIGUSR1 dumping every thread's stack into its log, and
# Ctrl-C restored to Python's default. A process started in the background by a
# non-interactive shell (`cmd &`, as CI scripts do) inherits SIGINT *ignored*, and Prefect
# 3.9's worker handles its first SIGINT by restoring the handler it found and sending
# SIGINT to itself again: ignored, so the worker idled for good until a second Ctrl-C
# (which it turns into a SIGKILL of itself). A terminal's Ctrl-C always finds the default.
_WORKER = ("import faulthandler, signal, sys; signal.signal(signal.SIGINT, "
           "signal.default_int_handler); faulthandler.register(signal.SIGUSR1, "
           "all_threads=True); from prefect.cli import app; sys.argv[0] = 'prefect'; "
           "sys.exit(app())")


def _prefect(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([bin_path("prefect"), *args], capture_output=True, text=True,
                          cwd=REPO, env=os.environ.copy(), timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_prefect_yaml_declares_the_process_docker_and_kubernetes_deployments() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    for name in ("training-process", "training-docker", "training-kubernetes"):
        assert by_name[name]["entrypoint"] == "flows/training.py:training_flow"
        entry, fn = by_name[name]["entrypoint"].split(":")
        assert f"def {fn}(" in (REPO / entry).read_text()
    assert by_name["training-docker"]["work_pool"]["job_variables"]["image"].startswith("nestad")
    # the Docker run happens in the image's working directory, where the Dockerfile puts it
    assert "WORKDIR /app" in (REPO / "Dockerfile").read_text()
    assert by_name["training-docker"]["pull"][0][
        "prefect.deployments.steps.set_working_directory"]["directory"] == "/app"


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_process_worker_runs_the_deployed_training_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in pipeline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # default 10: seconds per poll
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_project(tmp_path / "base")
    with logged_server([bin_path("prefect"), "server", "start", "--host", "127.0.0.1",
                        "--port", str(port)], f"{api}/health", tmp_path / "server.log"):
        _prefect("work-pool", "create", POOL, "--type", "process")
        _prefect("--no-prompt", "deploy", "--prefect-file", str(REPO / "prefect.yaml"),
                 "-n", "training-process", "--pool", POOL, "--param", f"project={root}")
        worker_log = tmp_path / "worker.log"
        worker = subprocess.Popen(  # its output (and the flow run's) to a file, not a pipe
            [sys.executable, "-c", _WORKER, "worker", "start", "--pool", POOL, "--type",
             "process"],
            stdout=worker_log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        state = "not triggered"
        try:
            run = _prefect("deployment", "run", "training/training-process")
            run_id = next(line.split()[-1] for line in run.stdout.splitlines()
                          if "UUID" in line)
            state = _wait_for(api, run_id, timeout=360)
            # The API says COMPLETED while the flow-run process may still be exiting: stop
            # the worker once it runs nothing.
            _wait_for_no_children(worker, timeout=60)
        finally:
            ctrl_cs, left = _stop(worker, grace_s=45)
            log = worker_log.read_text(errors="replace")
        # the flow run's own outcome first: a run still going explains a slow stop
        assert state == "COMPLETED", f"flow run ended {state}:\n{log[-4000:]}"
        assert ctrl_cs, (f"the worker outlived two SIGINTs 45 s apart; then running:\n{left}"
                         f"\nits log (with faulthandler's stacks):\n{log[-6000:]}")
        assert run_id in log  # this worker ran it
        # one Ctrl-C stops it cleanly (a second would be Prefect's SIGKILL of itself)
        assert ctrl_cs == 1, (f"the worker needed a second Ctrl-C (exit {worker.returncode});"
                              f" its stacks after the first:\n{log[-6000:]}")
        assert worker.returncode in (0, 1, -signal.SIGINT, 130), log[-2000:]
        assert re.search(r"Worker '[^']+' stopped", log), log[-2000:]
    from components.pipeline.workflow import load_project, registered_models

    project = load_project(root)
    models = registered_models(project)
    assert [m.version for m in models] == ["1"]
    assert "production" in models[0].aliases
    assert (project.out / "model" / "detector.pt").is_file()


def _descendants(pid: int) -> list[str]:
    """``ps`` lines (pid, ppid, session, state, elapsed, command) of ``pid``'s descendants,
    wherever their session (Prefect may start a flow run in a session of its own)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,sid=,stat=,etime=,args="],
                          capture_output=True, text=True).stdout.splitlines()
    children: dict[int, list[tuple[int, str]]] = {}
    for row in rows:
        fields = row.split(None, 2)
        children.setdefault(int(fields[1]), []).append((int(fields[0]), row.strip()))
    found, todo = [], [pid]
    while todo:
        for child, row in children.get(todo.pop(), []):
            found.append(row)
            todo.append(child)
    return found


def _wait_for_no_children(worker: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _descendants(worker.pid) and time.monotonic() < deadline:
        time.sleep(0.5)


def _stop(worker: subprocess.Popen, grace_s: float) -> tuple[int, str]:
    """Ctrl-C the worker's session, and once more if it is still up after ``grace_s`` (what
    a user does). Returns (how many Ctrl-Cs it took, ""), or (0, the ``ps`` lines of the
    worker and the processes under it) when it outlived both: it then gets SIGABRT, so
    faulthandler (PYTHONFAULTHANDLER) writes every thread's stack into its log, then
    SIGKILL with its session and descendants."""
    for attempt in (1, 2):
        os.killpg(worker.pid, signal.SIGINT)
        try:
            worker.wait(timeout=grace_s)
            return attempt, ""
        except subprocess.TimeoutExpired:
            os.kill(worker.pid, signal.SIGUSR1)  # where it hangs, into the log
            time.sleep(1)
    left = _descendants(worker.pid)
    os.kill(worker.pid, signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    for row in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(row.split()[0]), signal.SIGKILL)
    worker.wait()
    return 0, "\n".join([f"worker {worker.pid}", *left])


def _wait_for(api: str, run_id: str, timeout: float) -> str:
    """The flow run's final state type, polled over the server's REST API at ``api``.

    Plain HTTP, not Prefect's client: in a full test session an earlier test's Prefect
    settings (the test harness) may still be cached in this process, and a client would
    then ask another server (which answers 404 for this run)."""
    import json
    import urllib.request

    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=10) as resp:
            state = (json.loads(resp.read()).get("state") or {}).get("type")
        if state in final:
            return state
        time.sleep(1)
    return f"unfinished after {timeout}s"
