"""Benchmark: what orchestration costs. The training flow (Prefect tasks running the DVC
stages) versus calling the same components directly, on the same tiny synthetic project.

    .venv/bin/python benchmarks/overhead.py            # human-readable
    .venv/bin/python benchmarks/overhead.py --json     # one JSON object

Both paths start from an identical fresh project (tests/pipeline_support.py): ingest,
validate, train, evaluate, register and promote (a new MLflow store each; both version
the dataset with `dvc add`, as the ingest stage does). Each path runs in a fresh Python
process, timed from outside, so each pays its own interpreter start and imports (torch,
Great Expectations, MLflow, Prefect) as a user's script or ``nestad run`` does. The
flow's time includes starting Prefect's embedded server (every ``nestad run`` without a
configured server starts one), DVC's bookkeeping and Prefect's task states.

Prefect creates its database once per PREFECT_HOME, on the first run ever: that one-time
cost is measured first, in its own process, and reported apart (``prefect_first_start_s``).
``flow_per_process_s`` is the same flow with ``pipeline.in_process: false`` (each stage's
command in its own process, as ``dvc repro`` from a shell runs it).
Target from the issue: flow_s <= 1.2 * direct_s + 20.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipeline_support import make_project, pipeline_env  # noqa: E402

from components.pipeline.workflow import load_project  # noqa: E402


@contextlib.contextmanager
def _isolated(tmp: Path) -> Iterator[None]:
    """DVC, MLflow, Prefect and caches inside ``tmp``, quiet; restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(pipeline_env(tmp))
    os.environ.update(
        {
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
        }
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PREFECT_API_URL", None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_direct(root: Path) -> dict[str, float]:
    """The components, in this process, in pipeline order; seconds per step."""
    from components.config import load_params
    from components.data.ingest import ingest
    from components.data.validate import validate_dataset
    from components.data.version import ensure_repo, track_data
    from components.pipeline.stages import evaluate_stage, train_stage
    from components.registry.client import open_registry
    from components.registry.promote import promote_auto
    from components.registry.versions import register_run

    project = load_project(root)
    params = load_params(root / "params.yaml", profile=project.params.pipeline.profile)
    steps: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        steps[name] = time.perf_counter() - started
        return result

    source = str((root / params.ingest.source).resolve())

    def ingest_and_version() -> None:  # as the ingest stage does: ingest, then `dvc add`
        ingest(source, params.ingest, params.data, target=project.dataset)
        ensure_repo(root)
        track_data(root, params.ingest.data_root)

    timed("ingest", ingest_and_version)
    report = timed(
        "validate",
        lambda: validate_dataset(
            project.dataset,
            params.validation,
            params.data,
            report_dir=project.report_dir,
            workers=params.ingest.workers,
        ),
    )
    report.raise_for_failures()
    # As the pipeline's stages do: train, evaluate and register read the ingested dataset.
    manifest = params.model_copy(
        update={
            "data": params.data.model_copy(
                update={"source": str(project.dataset), "layout": "manifest"}
            )
        }
    )
    timed("train", lambda: train_stage(manifest, project.out))
    timed("evaluate", lambda: evaluate_stage(manifest, project.out))
    version = timed("register", lambda: register_run(manifest, root, project.out))
    timed("promote", lambda: promote_auto(open_registry(manifest.registry, root), version.version))
    return steps


def start_prefect() -> float:
    """Start Prefect's embedded server with an empty flow run; the seconds it took."""
    from prefect import flow

    @flow(name="overhead-warm-up")
    def warm_up() -> None:
        return None

    started = time.perf_counter()
    warm_up()
    return time.perf_counter() - started


def run_flow(root: Path) -> dict[str, Any]:
    """The training flow (embedded Prefect server, DVC stages); what it registered."""
    from flows.training import training_flow

    report = training_flow(str(root))
    promoted = bool(report.registered and report.promotion and report.promotion.promoted)
    return {"registered": report.registered is not None, "promoted": promoted}


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send this process's and its children's stdout to stderr (keeps --json clean)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def child(path: str, root: Path) -> dict[str, Any]:
    """One path, in this (fresh) process."""
    with _stdout_to_stderr():
        if path == "direct":
            steps = run_direct(root)
            return {"steps": steps}
        if path == "prefect":
            return {"prefect_start_s": start_prefect()}
        if path == "flow_per_process":
            params = yaml.safe_load((root / "params.yaml").read_text())
            params["pipeline"]["in_process"] = False
            (root / "params.yaml").write_text(yaml.safe_dump(params))
        return run_flow(root)


def _timed_child(path: str, root: Path) -> tuple[float, dict[str, Any]]:
    """Wall seconds of a fresh process running ``path``, from its start to its exit."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", path, "--root", str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the {path} path failed (exit {proc.returncode}); see stderr above")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-per-process", action="store_true", help="skip the process-per-stage flow"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root)))
        return 0

    with tempfile.TemporaryDirectory(prefix="nestad-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        with _isolated(tmp):
            first_start_s, _ = _timed_child("prefect", tmp)  # creates Prefect's database
            direct_s, direct = _timed_child("direct", make_project(tmp / "direct"))
            flow_s, flow = _timed_child("flow", make_project(tmp / "flow"))
            per_process_s = None
            if not args.no_per_process:
                per_process_s, per_process = _timed_child(
                    "flow_per_process", make_project(tmp / "flow-per-process")
                )
                if not per_process["promoted"]:
                    raise SystemExit(f"the per-process flow did not promote: {per_process}")
    if not flow["promoted"]:
        raise SystemExit(f"the flow did not register and promote a model: {flow}")
    result = {
        "flow_s": round(flow_s, 2),
        "direct_s": round(direct_s, 2),
        "ratio": round(flow_s / direct_s, 3),
        "fixed_s": round(flow_s - direct_s, 2),
        "target_s": round(1.2 * direct_s + 20, 2),
        "within_target": flow_s <= 1.2 * direct_s + 20,
        "flow_per_process_s": None if per_process_s is None else round(per_process_s, 2),
        "prefect_first_start_s": round(first_start_s, 2),
        "direct_steps_s": {k: round(v, 2) for k, v in direct["steps"].items()},
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"training flow (Prefect + DVC stages, in process): {flow_s:7.1f} s")
    if per_process_s is not None:
        print(f"training flow, a process per stage:             {per_process_s:7.1f} s")
    print(
        f"same components called directly:                {direct_s:7.1f} s  ("
        + ", ".join(f"{k} {v:.1f}" for k, v in direct["steps"].items())
        + " in the components; the rest is start-up and imports)"
    )
    print(f"Prefect's first start on a new PREFECT_HOME (once): {first_start_s:.1f} s")
    print(
        f"ratio {result['ratio']:.2f}; fixed overhead {result['fixed_s']:.1f} s; target "
        f"flow <= 1.2 x direct + 20 s = {result['target_s']:.1f} s: "
        f"{'met' if result['within_target'] else 'NOT met'} "
        f"(load average {result['load_avg_1m']} on {result['cpus']} CPUs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
