"""A monitoring report as an MLflow run: ``monitor.*`` metrics, the limits as params, the
verdict and the model compared as tags, the report files as artefacts (``monitoring/``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from components.config import Params
from components.registry.client import TAG, _errors, _experiment_id, open_registry
from components.registry.runs import _flatten_numbers, _log_batch

_FIGURES = ("score", "flagged", "image")


def log_monitoring(params: Params, root: Path, report: dict[str, Any], files: list[Path]
                   ) -> str:
    """Log ``report`` (``components.pipeline.monitor``) as a new run of the configured
    experiment; return its id."""
    reg = open_registry(params.registry, root)
    metrics = _flatten_numbers({k: report[k] for k in _FIGURES if isinstance(report.get(k), dict)},
                               "monitor.")
    metrics["monitor.images"] = float(report["images"])
    metrics["monitor.drift"] = float(bool(report["verdict"]["drift"]))
    with _errors(reg, "logging the monitoring report"):
        run = reg.client.create_run(
            _experiment_id(reg), run_name=f"monitor {Path(str(report['source'])).name}",
            tags={f"{TAG}kind": "monitoring"})
        run_id = run.info.run_id
        try:
            _log_batch(
                reg, run_id, metrics=metrics,
                params={f"monitor.{k}": v for k, v in report["limits"].items()},
                tags={
                    f"{TAG}monitor.source": report["source"],
                    f"{TAG}monitor.model": report["model"],
                    f"{TAG}monitor.drift": str(bool(report["verdict"]["drift"])).lower(),
                    f"{TAG}monitor.exceeded": ",".join(report["verdict"]["exceeded"]) or "none",
                },
            )
            for file in files:
                reg.client.log_artifact(run_id, str(file), "monitoring")
            reg.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            with contextlib.suppress(Exception):
                reg.client.set_terminated(run_id, "FAILED")
            raise
    return run_id
