"""Benchmark: what orchestration costs. The training flow (Prefect tasks running the DVC
stages, each stage a ``nestad`` subprocess) versus calling the same components directly
in this process, on the same tiny synthetic project, in one run.

    .venv/bin/python benchmarks/overhead.py            # human-readable
    .venv/bin/python benchmarks/overhead.py --json     # one JSON object

Both paths start from an identical fresh project (tests/pipeline_support.py): ingest,
validate, train, evaluate, register and promote (a new MLflow store each). The flow's time
includes starting Prefect's embedded server on a fresh PREFECT_HOME (as a first
``nestad run`` does; reported apart too), DVC, and each stage's process start and
imports. Target from the issue: flow_s <= 1.2 * direct_s + 20.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipeline_support import make_project, pipeline_env  # noqa: E402

from components.workflow import load_project  # noqa: E402


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
    from components.ingestion import ingest
    from components.pipeline import evaluate_stage, train_stage
    from components.tracking import open_registry, promote_auto, register_run
    from components.validation import validate_dataset

    project = load_project(root)
    params = load_params(root / "params.yaml", profile=project.params.pipeline.profile)
    steps: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        steps[name] = time.perf_counter() - started
        return result

    source = str((root / params.ingest.source).resolve())
    timed("ingest", lambda: ingest(source, params.ingest, params.data, target=project.dataset))
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


def run_flow(root: Path) -> Any:
    """The training flow (embedded Prefect server, DVC stages)."""
    from flows.training import training_flow

    return training_flow(str(root))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="nestad-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        with _isolated(tmp), _stdout_to_stderr():
            # Direct first: its in-process imports (torch, GX, MLflow) are paid here and
            # not again by the flow, whose stages import them in their own processes.
            direct_root = make_project(tmp / "direct")
            started = time.perf_counter()
            steps = run_direct(direct_root)
            direct_s = time.perf_counter() - started

            flow_root = make_project(tmp / "flow")
            started = time.perf_counter()
            prefect_start_s = start_prefect()  # part of the flow's cost, shown apart
            report = run_flow(flow_root)
            flow_s = time.perf_counter() - started
    if not (report.registered and report.promotion and report.promotion.promoted):
        raise SystemExit(f"the flow did not register and promote a model: {report}")
    result = {
        "flow_s": round(flow_s, 2),
        "direct_s": round(direct_s, 2),
        "ratio": round(flow_s / direct_s, 3),
        "fixed_s": round(flow_s - direct_s, 2),
        "target_s": round(1.2 * direct_s + 20, 2),
        "within_target": flow_s <= 1.2 * direct_s + 20,
        "prefect_start_s": round(prefect_start_s, 2),
        "direct_steps_s": {k: round(v, 2) for k, v in steps.items()},
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"training flow (Prefect + DVC stages): {flow_s:7.1f} s  (of which starting "
        f"Prefect's embedded server on a fresh PREFECT_HOME {prefect_start_s:.1f})"
    )
    print(
        f"same components called directly:     {direct_s:7.1f} s  "
        + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
    )
    print(
        f"ratio {result['ratio']:.2f}; fixed overhead {result['fixed_s']:.1f} s; target "
        f"flow <= 1.2 x direct + 20 s = {result['target_s']:.1f} s: "
        f"{'met' if result['within_target'] else 'NOT met'} "
        f"(load average {result['load_avg_1m']} on {result['cpus']} CPUs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
