"""Run logging: params, per-epoch figures (``epoch.*``, step = epoch), final figures of
both protocols (``leak_free.*``, ``paper_compatible.*``), reports, plots, the data and code
versions as tags and run inputs, and the validation summary."""

from __future__ import annotations

import getpass
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.config import (
    Params,
    flatten_params,
)
from components.registry.client import TAG, Registry, _describe, _errors, _experiment_id
from components.registry.provenance import DataVersion, _validation_summary, code_version

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_batch(
    reg: Registry,
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    step: int = 0,
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    ts = _now_ms()
    for part in _chunks([Metric(k, float(v), ts, step) for k, v in (metrics or {}).items()], 1000):
        reg.client.log_batch(run_id, metrics=part)
    for part in _chunks([Param(k, _text(v, 6000)) for k, v in (params or {}).items()], 100):
        reg.client.log_batch(run_id, params=part)
    for part in _chunks(
        [RunTag(k, _text(v, 5000)) for k, v in (tags or {}).items() if v is not None], 100
    ):
        reg.client.log_batch(run_id, tags=part)


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def start_run(
    reg: Registry, params: Params, run_name: str | None = None, parent_run_id: str | None = None
) -> str:
    """Open a run in the configured experiment, log the flattened params; return its id."""
    with _errors(reg, "starting an MLflow run"):
        tags = {"mlflow.source.type": "LOCAL", "mlflow.user": getpass.getuser()}
        if parent_run_id:
            reg.client.get_run(parent_run_id)  # fails clearly if the parent is unknown
            tags["mlflow.parentRunId"] = parent_run_id
        run = reg.client.create_run(_experiment_id(reg), run_name=run_name, tags=tags)
        _log_batch(reg, run.info.run_id, params=flatten_params(params))
        return run.info.run_id


def _epoch_metrics(report: dict[str, Any]) -> dict[str, float]:
    return {
        f"epoch.{k}": float(v)
        for k, v in report.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def epoch_logger(reg: Registry, run_id: str) -> Callable[[Any], None]:
    """An ``on_epoch`` callback logging an ``EpochReport`` as ``epoch.*`` at step = epoch.

    A tracking failure is logged as a warning, never stops training; ``register_run``
    later fills in any epoch missing from the run.
    """

    def on_epoch(report: Any) -> None:
        values = asdict(report) if not isinstance(report, dict) else report
        try:
            _log_batch(reg, run_id, metrics=_epoch_metrics(values), step=int(values["epoch"]))
        except Exception as exc:  # noqa: BLE001 - training must not die for the tracker
            log.warning(
                "epoch %s not logged to MLflow (%s); `nestad register` will add it",
                values.get("epoch"),
                _describe(exc),
            )

    return on_epoch


def _flatten_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_numbers(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics from ``metrics.json``: ``leak_free.*``, ``paper_compatible.*``,
    ``pixel.*``, ``synthetic_validation.*``, ``normalisation.*``, ``counts.*`` and
    ``checkpoint_epoch``."""
    keep = {
        k: metrics[k]
        for k in ("leak_free", "paper_compatible", "pixel", "synthetic_validation",
                  "normalisation", "counts")
        if isinstance(metrics.get(k), dict)
    }
    flat = _flatten_numbers(keep)
    if "checkpoint_epoch" in metrics:
        flat["checkpoint_epoch"] = float(metrics["checkpoint_epoch"])
    return flat


def _log_history(reg: Registry, run_id: str, history: dict[str, Any]) -> None:
    """Log the epochs of ``train_history.json`` the run does not already hold."""
    from mlflow.entities import Metric

    logged = {m.step for m in reg.client.get_metric_history(run_id, "epoch.loss_g")}
    ts = _now_ms()
    rows = [
        Metric(k, v, ts, int(epoch["epoch"]))
        for epoch in history.get("epochs", [])
        if int(epoch["epoch"]) not in logged
        for k, v in _epoch_metrics(epoch).items()
    ]
    for part in _chunks(rows, 1000):
        reg.client.log_batch(run_id, metrics=part)


def _log_inputs(reg: Registry, run_id: str, data: DataVersion, eval_digest: str | None) -> None:
    """The data version as MLflow dataset inputs (no data uploaded, only identity)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "local path can be interpreted in multiple ways"
        source = resolve_dataset_source(data.source)
    name = Path(data.source).name
    key = data.key or "unversioned"
    inputs = [
        (
            MetaDataset(source, name=name, digest=key[:36]),
            "training",
            {
                "dvc_md5": data.dvc_md5,
                "manifest_sha256": data.manifest_sha256,
                "source_sha256": data.source_sha256,
                "data_version": data.key,
            },
        )
    ]
    if eval_digest:
        inputs.append(
            (
                MetaDataset(source, name=f"{name}-test", digest=eval_digest[:32]),
                "evaluation",
                {"eval_data_version": eval_digest, "data_version": data.key},
            )
        )
    reg.client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                ds._to_mlflow_entity(),
                tags=[InputTag("mlflow.data.context", context)]
                + [InputTag(k, v) for k, v in tags.items() if v],
            )
            for ds, context, tags in inputs
        ],
    )


def log_run_folder(
    reg: Registry,
    run_id: str,
    out: Path,
    params: Params,
    data: DataVersion,
    eval_digest: str | None,
) -> dict[str, float]:
    """Log a finished run folder to ``run_id``: figures, reports, plots, data and code
    versions, validation verdict. Returns the final metrics logged."""
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "train_history.json").read_text())
    figures = final_metrics(metrics)
    code = code_version(reg.root)
    validation = _validation_summary(params, reg.root, data)
    used = {**history.get("counts", {}), **metrics.get("counts", {})}
    with _errors(reg, f"logging run folder {out} to run {run_id}"):
        _log_history(reg, run_id, history)
        _log_batch(
            reg,
            run_id,
            metrics=figures,
            tags={
                f"{TAG}protocol.leak_free": metrics.get("leak_free", {}).get("protocol"),
                f"{TAG}protocol.paper_compatible": metrics.get("paper_compatible", {}).get(
                    "protocol"
                ),
                f"{TAG}threshold_used": metrics.get("leak_free", {}).get("threshold_used"),
                f"{TAG}best_epoch": history.get("best_epoch"),
                f"{TAG}run_folder": str(out.resolve()),
                **_data_tags(data, eval_digest, used, validation),
                **{f"{TAG}{k}": v for k, v in code.items()},
                "mlflow.source.git.commit": code["git_commit"],
            },
        )
        for name in ("metrics.json", "train_history.json", "test_scores.csv"):
            reg.client.log_artifact(run_id, str(out / name), "reports")
        if (out / "monitoring_reference.json").is_file():  # what `nestad monitor` compares with
            reg.client.log_artifact(run_id, str(out / "monitoring_reference.json"), "reports")
        for plot in sorted((out / "plots").glob("*.png")):
            reg.client.log_artifact(run_id, str(plot), "plots")
        if (out / "report" / "index.html").is_file():  # the inspection page and its pictures
            reg.client.log_artifacts(run_id, str(out / "report"), "report")
        if validation and Path(validation["file"]).is_file():
            reg.client.log_artifact(run_id, validation["file"], "validation")
        if (reg.root / "dvc.lock").is_file():  # every stage's deps, params and outs hashes
            reg.client.log_artifact(run_id, str(reg.root / "dvc.lock"), "lineage")
        reg.client.log_dict(
            run_id,
            {
                "data": asdict(data),
                "data_version": data.key,
                "eval_data_version": eval_digest,
                "used_counts": used,
                "validation": validation,
                "code": code,
            },
            "lineage/lineage.json",
        )
        _log_inputs(reg, run_id, data, eval_digest)
    return figures


def _data_tags(
    data: DataVersion,
    eval_digest: str | None,
    used: dict[str, Any],
    validation: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        f"{TAG}data_version": data.key,
        f"{TAG}dvc_md5": data.dvc_md5,
        f"{TAG}manifest_sha256": data.manifest_sha256,
        f"{TAG}source_sha256": data.source_sha256,
        f"{TAG}data_source": data.source,
        f"{TAG}data_counts": data.counts or None,
        f"{TAG}used_counts": used,
        f"{TAG}eval_data_version": eval_digest,
        f"{TAG}validation": validation,
        f"{TAG}validation_success": (
            None if validation is None else str(validation.get("success")).lower()
        ),
    }
