"""MLflow tracking, registry, promotion and lineage: the only module that imports ``mlflow``.

Nothing happens at import time: ``mlflow`` is imported, and its environment set, inside
the functions that need it.

Store: ``registry.tracking_uri`` when set, else ``$MLFLOW_TRACKING_URI``, else an embedded
SQLite store ``sqlite:///<project>/mlflow.db`` with artefacts in ``<project>/mlartifacts``.
Server requests are retried ``registry.http_max_retries`` times with exponential backoff,
then fail with one clear ``RegistryError``.

What a registered version carries (see ``register_run``):

- the run: flattened params, per-epoch losses and validation figures (``epoch.*``, step =
  epoch), final figures of both protocols (``leak_free.*``, ``paper_compatible.*``),
  normalisation statistics, plots, metrics/history/test-score reports, the validation
  summary, the data version as run inputs, the git commit and the ``dvc.lock`` hash;
- the model: an MLflow pyfunc logged *from code* (nothing pickled) whose one artefact is
  ``detector.pt`` (state dicts + normalisation statistics + thresholds, loaded with
  ``weights_only=True``), with a signature, an input example, pinned requirements and
  the ``components`` package as code;
- version tags ``nestad.*``: data and evaluation-data versions, git commit, and one
  ``nestad.transition.NNN`` tag per alias move (who, when, why, figures compared).

A version is registered only after every artefact is logged and verified; if
registration fails part-way, the half-made version is deleted and aliases restored.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from components.config import (
    Params,
    RegistryConfig,
    flatten_params,
    load_params,
    project_path,
)
from components.errors import NestadError
from components.promotion import (
    CANDIDATE,
    PRODUCTION,
    STAGES,
    STAGING,
    GateDecision,
    VersionFigures,
    check_transition,
    decide_promotion,
)
from components.versioning import DATA_TARGET, data_version

log = logging.getLogger(__name__)

TAG = "nestad."
TRANSITION_TAG = f"{TAG}transition."
MODEL_NAME_IN_RUN = "model"  # the logged model's name within its run
DETECTOR_ARTIFACT = "detector"  # key of detector.pt in the pyfunc's artifacts
LOCK_SUFFIX = ".promotion-lock"  # registered model used as a cross-process mutex
# Packages the served model imports; pinned to the versions installed here.
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "pyyaml",
    "scikit-learn",
)
_QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
_RUN_FILES = ("metrics.json", "train_history.json", "test_scores.csv", "model/detector.pt")


class RegistryError(NestadError):
    """The tracking server or registry failed, or holds something unexpected."""


# ----------------------------------------------------------------------------------------
# Connecting
# ----------------------------------------------------------------------------------------


def _mlflow(cfg: RegistryConfig | None = None) -> Any:
    """Import mlflow with telemetry off and bounded HTTP retries from ``cfg``."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if cfg is not None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.http_max_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(cfg.http_backoff_factor)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.http_timeout_s)
    import mlflow

    return mlflow


def tracking_uri(cfg: RegistryConfig, root: Path) -> str:
    """``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in ``root``."""
    return (
        cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    )


@dataclass
class Registry:
    """A connection to one tracking store and registry, with the config that chose it."""

    cfg: RegistryConfig
    root: Path
    uri: str
    client: Any  # mlflow.MlflowClient

    @property
    def name(self) -> str:
        return self.cfg.model_name


def open_registry(cfg: RegistryConfig, root: Path) -> Registry:
    """Connect to the tracking store and registry ``cfg`` names (nothing is written yet)."""
    mlflow = _mlflow(cfg)
    uri = tracking_uri(cfg, root)
    # For mlflow's fluent calls (log_model). set_*_uri also export MLFLOW_TRACKING_URI and
    # MLFLOW_REGISTRY_URI; restore them so the next open_registry sees the user's choice.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return Registry(
        cfg, Path(root).resolve(), uri, mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return any(
        s in text
        for s in (
            "Max retries exceeded",
            "Connection refused",
            "ConnectionError",
            "Read timed out",
            "ResponseError",
        )
    )


@contextlib.contextmanager
def _errors(reg: Registry, what: str) -> Iterator[None]:
    """Turn MLflow, HTTP and storage failures into one RegistryError naming ``what``."""
    try:
        yield
    except NestadError:
        raise
    except Exception as exc:  # noqa: BLE001 - mlflow raises many types; all mean "failed"
        if _unreachable(exc):
            raise RegistryError(
                f"{what}: the tracking server at {reg.uri} did not answer after "
                f"{reg.cfg.http_max_retries} retries ({_describe(exc)})"
            ) from exc
        raise RegistryError(f"{what}: {_describe(exc)} (tracking URI {reg.uri})") from exc


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


def _not_found(exc: BaseException) -> bool:
    return _error_code(exc) == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower()


def _retry(fn: Callable[[], Any], attempts: int = 8) -> Any:
    """Retry a call that lost a write race on SQLite ("database is locked", a duplicate
    key from a concurrent upsert); HTTP failures are retried by MLflow itself."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            transient = "database is locked" in text or "UNIQUE constraint" in text
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt * (0.5 + random.random()))
    return None  # unreachable


def _experiment_id(reg: Registry) -> str:
    """The configured experiment's id, created on first use."""
    exp = reg.client.get_experiment_by_name(reg.cfg.experiment)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise RegistryError(
                f"experiment {reg.cfg.experiment!r} is deleted; restore it or "
                "set registry.experiment"
            )
        return exp.experiment_id
    location = reg.cfg.artifact_location
    if location is None and reg.uri.startswith("sqlite:"):
        location = (reg.root / "mlartifacts").as_uri()
    try:
        return reg.client.create_experiment(reg.cfg.experiment, artifact_location=location)
    except Exception as exc:  # noqa: BLE001 - created concurrently by another process
        exp = reg.client.get_experiment_by_name(reg.cfg.experiment)
        if exp is None:
            raise
        log.debug("experiment created concurrently: %s", exc)
        return exp.experiment_id


# ----------------------------------------------------------------------------------------
# Data version, code version
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataVersion:
    """Which data a run used: DVC hash, manifest hash and what the manifest holds."""

    source: str
    dvc_md5: str | None = None  # outs[0].md5 of data.dvc, when the source lies inside it
    manifest_sha256: str | None = None  # of <dataset>/manifest.csv
    source_sha256: str | None = None  # of an archive source (no manifest)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> normal/anom.

    @property
    def key(self) -> str | None:
        """The one identifier of this data version (None: unversioned raw folder)."""
        return self.dvc_md5 or self.manifest_sha256 or self.source_sha256


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_data(source: str, root: Path) -> DataVersion:
    """The data version of a training source (relative paths are from ``root``).

    The DVC md5 is recorded when the source lies inside the DVC-tracked ``data/`` (the
    pipeline's ingest stage keeps ``data.dvc`` up to date).
    """
    from components.data import MANIFEST_NAME, read_manifest

    path = project_path(root, source).resolve()
    dvc_md5 = manifest_sha = source_sha = None
    counts: dict[str, dict[str, int]] = {}
    tracked = (root / DATA_TARGET).resolve()
    if (root / f"{DATA_TARGET}.dvc").is_file() and (path == tracked or tracked in path.parents):
        dvc_md5 = data_version(root, DATA_TARGET)
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        manifest_sha = _sha256_file(manifest)
        frame = read_manifest(path)
        for (split, normal), n in frame.groupby(["split", "is_normal"]).size().items():
            counts.setdefault(str(split), {"normal": 0, "anomalous": 0})[
                "normal" if normal else "anomalous"
            ] = int(n)
    elif path.is_file():
        source_sha = _sha256_file(path)
    return DataVersion(str(path), dvc_md5, manifest_sha, source_sha, counts)


def eval_data_digest(data: DataVersion, test_scores: Path) -> str | None:
    """Digest of the evaluation set: every test image and label, nothing else.

    Two runs share it only if they were scored on the same images with the same labels,
    so their test figures are comparable. The dataset version is deliberately left out:
    retraining on new normal images changes it but leaves the sealed test split as it was
    (ingested paths are content hashes), and the gate must still compare such a model
    with production. None for unversioned data, whose paths do not identify content.
    """
    import csv

    if data.key is None:
        return None
    with test_scores.open(newline="") as fh:
        rows = sorted((r["path"], r["label"], r["is_anomaly"]) for r in csv.DictReader(fh))
    # An archive's paths name files, not content: there the archive's hash stays in.
    content_addressed = data.dvc_md5 is not None or data.manifest_sha256 is not None
    digest = hashlib.sha256(b"nestad-eval-set/2\n" if content_addressed
                            else f"{data.key}\n".encode())
    for row in rows:
        digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def code_version(root: Path) -> dict[str, str | None]:
    """Git commit (and whether the tree differs from it) and the dvc.lock hash."""
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    lock = root / "dvc.lock"
    return {
        "git_commit": _git(root, "rev-parse", "HEAD"),
        "git_dirty": None if status is None else str(bool(status)).lower(),
        "dvc_lock_sha256": _sha256_file(lock) if lock.is_file() else None,
    }


def _validation_summary(params: Params, root: Path, data: DataVersion) -> dict[str, Any] | None:
    """The latest ``nestad validate`` verdict for this dataset, or None if there is none."""
    file = project_path(root, params.validation.report_dir) / "summary.json"
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError):
        return {"file": str(file), "success": None, "note": "unreadable summary.json"}
    result = {
        "file": str(file),
        "dataset": summary.get("dataset"),
        "success": summary.get("success"),
        "images": summary.get("images"),
        "failed": [
            o.get("name")
            for o in summary.get("outcomes", [])
            if isinstance(o, dict) and not o.get("success")
        ],
    }
    if summary.get("dataset") and Path(summary["dataset"]).resolve() != Path(data.source):
        result["note"] = "summary is for another dataset"
        result["success"] = None
    manifest = Path(data.source) / "manifest.csv"
    if manifest.is_file() and manifest.stat().st_mtime > file.stat().st_mtime:
        result["note"] = "manifest changed after validation"
        result["success"] = None
    return result


# ----------------------------------------------------------------------------------------
# Runs: params, per-epoch figures, final figures, artefacts, inputs
# ----------------------------------------------------------------------------------------


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
    ``normalisation.*``, ``counts.*`` and ``checkpoint_epoch``."""
    keep = {
        k: metrics[k]
        for k in ("leak_free", "paper_compatible", "normalisation", "counts")
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
        for plot in sorted((out / "plots").glob("*.png")):
            reg.client.log_artifact(run_id, str(plot), "plots")
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


# ----------------------------------------------------------------------------------------
# The pyfunc model
# ----------------------------------------------------------------------------------------


def build_pyfunc_model() -> Any:
    """The MLflow ``PythonModel`` serving a ``detector.pt`` (see ``components.serving``).

    Defined inside a function so that importing this module does not import mlflow. The
    logged model's code file calls this and ``set_model``: nothing is pickled.
    """
    mlflow = _mlflow()
    from components.packaging import load_detector
    from components.serving import score_request

    class NestadDetectorModel(mlflow.pyfunc.PythonModel):
        """Scores a table of images (``path`` or ``image_b64`` per row)."""

        def load_context(self, context: Any) -> None:
            self.detector, self.meta = load_detector(Path(context.artifacts[DETECTOR_ARTIFACT]))

        # A DataFrame hint tells MLflow not to derive a second signature from hints.
        def predict(
            self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
        ) -> pd.DataFrame:
            threshold = (params or {}).get("threshold") or None
            return score_request(self.detector, self.meta, model_input, threshold=threshold)

    return NestadDetectorModel()


_MODEL_CODE = '''"""MLflow models-from-code entry point of a nestad detector (nothing pickled)."""
from mlflow.models import set_model

from components.tracking import build_pyfunc_model

set_model(build_pyfunc_model())
'''


def _public_version(dist: str) -> str:
    return metadata.version(dist).split("+", 1)[0]  # torch 2.13.0+cpu -> 2.13.0


def serving_requirements() -> list[str]:
    """Pinned pip requirements of the served model (the versions installed here)."""
    return [f"{dist}=={_public_version(dist)}" for dist in SERVING_REQUIREMENTS]


def _signature(threshold: str) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from components.serving import INPUT_COLUMNS

    return ModelSignature(
        inputs=Schema([ColSpec("string", c, required=False) for c in INPUT_COLUMNS]),
        outputs=Schema(
            [
                ColSpec("double", "score"),
                ColSpec("double", "normalised_score"),
                ColSpec("boolean", "is_anomaly"),
            ]
        ),
        params=ParamSchema([ParamSpec("threshold", "string", threshold)]),
    )


def log_pyfunc(reg: Registry, run_id: str, detector_file: Path) -> tuple[str, str]:
    """Log ``detector_file`` as the run's pyfunc model; return (model URI, model id).

    The logged files are checked (MLmodel, requirements, code, the detector's size)
    before this returns, so a registered version is never missing an artefact.
    """
    from components.packaging import load_detector
    from components.serving import example_request

    mlflow = _mlflow(reg.cfg)
    _, meta = load_detector(detector_file)
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="nestad-pyfunc-") as tmp:
        code_dir = Path(tmp) / "components"
        code_dir.mkdir()
        for file in sorted(package.glob("*.py")):  # sources only, no caches
            shutil.copy2(file, code_dir / file.name)
        model_code = Path(tmp) / "nestad_model.py"
        model_code.write_text(_MODEL_CODE)
        with _errors(reg, f"logging the model of run {run_id}"):
            with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch "+cpu" label, integer-schema hints
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME_IN_RUN,
                    python_model=str(model_code),
                    artifacts={DETECTOR_ARTIFACT: str(detector_file)},
                    code_paths=[str(code_dir)],
                    signature=_signature(meta["threshold"]),
                    input_example=example_request(meta["image_size"], meta["channels"]),
                    pip_requirements=serving_requirements(),
                    metadata={
                        "nestad_format": meta["format"],
                        "image_size": meta["image_size"],
                        "channels": meta["channels"],
                        "threshold": meta["threshold"],
                        "generator": meta["model"]["name"],
                    },
                )
            _verify_model(
                reg,
                info.model_id,
                detector_file,
                [f"code/components/{f.name}" for f in code_dir.glob("*.py")],
            )
    return info.model_uri, info.model_id


def _verify_model(reg: Registry, model_id: str, detector_file: Path, code_files: list[str]) -> None:
    """Raise unless the logged model is READY and holds every file it needs."""
    model = reg.client.get_logged_model(model_id)
    if str(model.status).upper().split(".")[-1] != "READY":
        raise RegistryError(f"logged model {model_id} is {model.status}, not READY")
    found: dict[str, int | None] = {}
    pending = [""]
    while pending:
        for info in reg.client.list_logged_model_artifacts(model_id, pending.pop() or None):
            if info.is_dir:
                pending.append(info.path)
            else:
                found[info.path] = info.file_size
    expected = {
        "MLmodel": None,
        "requirements.txt": None,
        f"artifacts/{detector_file.name}": detector_file.stat().st_size,
        **dict.fromkeys(code_files),
    }
    missing = [p for p in expected if p not in found]
    if missing:
        raise RegistryError(f"logged model {model_id} lacks {', '.join(sorted(missing))}")
    detector_path = f"artifacts/{detector_file.name}"
    if found[detector_path] not in (None, expected[detector_path]):
        raise RegistryError(
            f"logged model {model_id}: {detector_path} has "
            f"{found[detector_path]} bytes, expected {expected[detector_path]}"
        )


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredVersion:
    """A new registered version and where it came from."""

    name: str
    version: str
    run_id: str
    model_uri: str
    data_version: str | None
    eval_data_version: str | None
    metrics: dict[str, float]


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _transition(frm: str | None, to: str | None, why: str, **extra: Any) -> str:
    return json.dumps(
        {"from": frm, "to": to, "by": _actor(), "at": _iso_now(), "why": why, **extra}, default=str
    )


def _next_transition_key(tags: dict[str, str]) -> str:
    seqs = [
        int(k.rsplit(".", 1)[1])
        for k in tags
        if k.startswith(TRANSITION_TAG) and k.rsplit(".", 1)[1].isdigit()
    ]
    return f"{TRANSITION_TAG}{max(seqs, default=0) + 1:03d}"


def check_run_folder(out: Path, params: Params) -> None:
    """Raise unless ``out`` is a finished, evaluated run folder made with these params."""
    from components.packaging import load_detector

    missing = [name for name in _RUN_FILES if not (out / name).is_file()]
    if missing:
        raise RegistryError(
            f"{out}: not an evaluated run folder (missing "
            f"{', '.join(missing)}); run `nestad train --evaluate` first"
        )
    _, meta = load_detector(out / "model" / "detector.pt")
    built = {
        "model": meta["model"],
        "data.image_size": meta["image_size"],
        "data.channels": meta["channels"],
        "evaluate.threshold": meta["threshold"],
    }
    given = {
        "model": params.model.model_dump(),
        "data.image_size": params.data.image_size,
        "data.channels": params.data.channels,
        "evaluate.threshold": params.evaluate.threshold,
    }
    differ = [k for k in built if built[k] != given[k]]
    if differ:
        raise RegistryError(
            f"{out / 'model' / 'detector.pt'} was not made with these params ("
            + "; ".join(f"{k}: model {built[k]} vs params {given[k]}" for k in differ)
            + "); pass the same --profile/-s as `nestad train`"
        )


def register_run(
    params: Params,
    root: Path,
    out: Path,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    reason: str | None = None,
) -> RegisteredVersion:
    """Log an evaluated run folder and register it as a new ``candidate`` version.

    ``run_id``: a run already tracking this training (``start_run`` + ``epoch_logger``);
    otherwise a new run is made. All artefacts are logged and verified before the version
    is created; a failure after that deletes the version and restores the aliases, so the
    registry is left as it was.
    """
    root, out = Path(root).resolve(), Path(out)
    check_run_folder(out, params)
    data = describe_data(params.data.source, root)
    eval_digest = eval_data_digest(data, out / "test_scores.csv")
    reg = open_registry(params.registry, root)
    run_id = run_id or start_run(reg, params, run_name or f"register {out.name}", parent_run_id)
    try:
        figures = log_run_folder(reg, run_id, out, params, data, eval_digest)
        model_uri, model_id = log_pyfunc(reg, run_id, out / "model" / "detector.pt")
        with _errors(reg, f"finishing run {run_id}"):
            _log_batch(reg, run_id, tags={f"{TAG}model_uri": model_uri})
            reg.client.set_terminated(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):
            reg.client.set_terminated(run_id, "FAILED")
        raise
    with _errors(reg, f"reading run {run_id}"):
        run = reg.client.get_run(run_id)
    tags = {
        k: v
        for k, v in run.data.tags.items()
        if k.startswith(TAG) and not k.startswith(f"{TAG}protocol.")
    }
    tags[f"{TAG}run_id"] = run_id
    tags[f"{TRANSITION_TAG}001"] = _transition(
        None,
        CANDIDATE,
        reason or f"registered from run {run_id} ({out})",
        metric=reg.cfg.gate_metric,
        value=figures.get(reg.cfg.gate_metric),
    )
    version = _create_version(reg, model_uri, model_id, run_id, tags)
    return RegisteredVersion(reg.name, version, run_id, model_uri, data.key, eval_digest, figures)


def _create_version(
    reg: Registry, model_uri: str, model_id: str, run_id: str, tags: dict[str, str]
) -> str:
    """Create the version and give it ``candidate``; on failure undo both."""
    from mlflow.exceptions import MlflowException

    client, name = reg.client, reg.name
    created_model = False
    with _errors(reg, f"registering model {name!r}"):
        try:
            _retry(
                lambda: client.create_registered_model(
                    name, description="nestad anomaly detector (fully-nested encoder-decoder GAN)"
                )
            )
            created_model = True
        except MlflowException as exc:
            if "ALREADY_EXISTS" not in _error_code(exc):
                raise
        previous = _alias_version(reg, CANDIDATE)
    version = None
    try:
        with _errors(reg, f"registering a version of {name!r}"):
            mv = client.create_model_version(
                name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id
            )
            version = str(mv.version)
            _retry(lambda: client.set_registered_model_alias(name, CANDIDATE, version))
            if _alias_version(reg, CANDIDATE) != version:
                raise RegistryError(
                    f"alias {CANDIDATE!r} of {name!r} moved during "
                    f"registration of version {version}"
                )
    except BaseException:
        _undo_version(reg, version, run_id, previous, created_model)
        raise
    if previous and previous != version:
        _record(reg, previous, _transition(CANDIDATE, None, f"superseded by version {version}"))
    return version


def _undo_version(
    reg: Registry,
    version: str | None,
    run_id: str,
    previous_candidate: str | None,
    created_model: bool,
) -> None:
    """Best effort: remove the half-made version (found by run id when its creation's
    answer was lost), put ``candidate`` back where it was, drop a model made for it."""
    client, name = reg.client, reg.name
    try:
        if version is not None:
            doomed = [version]
        else:
            doomed = [
                str(mv.version)
                for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
            ]
        for number in doomed:
            client.delete_model_version(name, number)
        if previous_candidate and _alias_version(reg, CANDIDATE) != previous_candidate:
            client.set_registered_model_alias(name, CANDIDATE, previous_candidate)
        if created_model and not client.search_model_versions(f"name='{name}'", max_results=1):
            client.delete_registered_model(name)
    except Exception as exc:  # noqa: BLE001 - report, keep the original error
        log.error(
            "could not undo the half-made version %s of %r (%s); delete it with the "
            "MLflow UI or client before promoting",
            version or f"of run {run_id}",
            name,
            _describe(exc),
        )


def _alias_version(reg: Registry, alias: str, name: str | None = None) -> str | None:
    """The version holding ``alias``, or None."""
    try:
        return str(reg.client.get_model_version_by_alias(name or reg.name, alias).version)
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc):
            return None
        raise


def _record(reg: Registry, version: str, transition: str) -> None:
    """Append a transition tag to a version (best effort for bystander versions)."""
    try:
        mv = reg.client.get_model_version(reg.name, version)
        key = _next_transition_key(mv.tags)
        reg.client.set_model_version_tag(reg.name, version, key, transition)
    except Exception as exc:  # noqa: BLE001
        log.warning("transition of version %s not recorded (%s)", version, _describe(exc))


# ----------------------------------------------------------------------------------------
# Promotion
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromotionResult:
    """What one promotion step did."""

    version: str
    target: str
    promoted: bool
    reason: str
    replaced: str | None = None  # the version that held ``target`` before
    decision: GateDecision | None = None


@contextlib.contextmanager
def promotion_lock(reg: Registry) -> Iterator[None]:
    """Hold the model's promotion lock: a registered model ``<name>.promotion-lock``.

    Creating a registered model is atomic in every MLflow store (a unique name), so only
    one process holds it. A lock older than ``lock_ttl_s`` was abandoned and is taken over.
    """
    from mlflow.exceptions import MlflowException

    lock, token = f"{reg.name}{LOCK_SUFFIX}", uuid.uuid4().hex
    deadline = time.monotonic() + reg.cfg.lock_timeout_s
    with _errors(reg, f"taking the promotion lock {lock!r}"):
        while True:
            try:
                reg.client.create_registered_model(
                    lock,
                    tags={
                        "token": token,
                        "holder": _actor(),
                        "pid": str(os.getpid()),
                        "acquired_at": str(time.time()),
                    },
                    description="held while a nestad promotion moves aliases; delete it if "
                    "no promotion is running",
                )
                break
            except MlflowException as exc:
                # Held by another process, or released between the insert and the read of
                # the existing holder that SQL stores do on a duplicate name.
                if not (
                    "ALREADY_EXISTS" in _error_code(exc)
                    or _not_found(exc)
                    or "database is locked" in str(exc)
                ):
                    raise
            if _break_stale_lock(reg, lock):
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"another promotion of {reg.name!r} holds the lock {lock!r}; waited "
                    f"{reg.cfg.lock_timeout_s:g}s. If none is running, delete that registered "
                    "model"
                )
            time.sleep(0.05 + 0.1 * random.random())
    try:
        yield
    finally:
        try:
            held = reg.client.get_registered_model(lock)
            if held.tags.get("token") == token:
                reg.client.delete_registered_model(lock)
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "promotion lock %r not released (%s); it expires after %gs",
                lock,
                _describe(exc),
                reg.cfg.lock_ttl_s,
            )


def _break_stale_lock(reg: Registry, lock: str) -> bool:
    """Delete the lock if its holder took it more than ``lock_ttl_s`` ago.

    A lock read without its tags (released and re-taken between two reads) is not stale;
    the token is re-read just before deleting, so a lock taken over meanwhile survives.
    """
    try:
        held = reg.client.get_registered_model(lock)
        token, since = held.tags.get("token"), held.tags.get("acquired_at")
        if not token or not since or time.time() - float(since) <= reg.cfg.lock_ttl_s:
            return False
        if reg.client.get_registered_model(lock).tags.get("token") != token:
            return False
        log.warning(
            "taking over promotion lock %r abandoned by %s %.0fs ago",
            lock,
            held.tags.get("holder"),
            time.time() - float(since),
        )
        reg.client.delete_registered_model(lock)
        return True
    except Exception as exc:  # noqa: BLE001 - released or replaced meanwhile: retry
        log.debug("lock check: %s", exc)
        return False


def _aliases_of(reg: Registry, version: str) -> set[str]:
    return {alias for alias in STAGES if _alias_version(reg, alias) == version}


def version_figures(reg: Registry, version: str) -> VersionFigures:
    """Metrics and evaluation-data version of a registered version (for the gate)."""
    mv = reg.client.get_model_version(reg.name, version)
    metrics = reg.client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return VersionFigures(str(mv.version), dict(metrics), mv.tags.get(f"{TAG}eval_data_version"))


def gate_decision(reg: Registry, version: str, holder: str | None) -> GateDecision:
    """The promotion gate's verdict on ``version`` against ``holder`` (the production
    version; None when there is none), with the registry's configured metric and margin."""
    cfg = reg.cfg
    return decide_promotion(
        version_figures(reg, version),
        version_figures(reg, holder) if holder else None,
        cfg.gate_metric,
        cfg.gate_margin,
        cfg.gate_higher_is_better,
    )


def promote(
    reg: Registry,
    target: str,
    version: str | None = None,
    *,
    force: bool = False,
    reason: str | None = None,
) -> PromotionResult:
    """Move ``target``'s alias to a version (default: the holder of the previous stage).

    ``production`` goes through the gate (``decide_promotion``) unless ``force``. Runs
    under the promotion lock, so the gate compares against the production version that is
    replaced, and exactly one version holds each alias afterwards (verified by re-reading).
    """
    with _errors(reg, f"promoting to {target}"), promotion_lock(reg):
        return _promote_locked(reg, target, version, force, reason)


def promote_auto(
    reg: Registry, version: str | None = None, reason: str | None = None
) -> list[PromotionResult]:
    """The automatic gate, under one lock: the candidate (or ``version``) moves to staging,
    then to production if it beats production on the same evaluation data by more than
    the margin on the gate metric."""
    with _errors(reg, "automatic promotion"), promotion_lock(reg):
        version = version or _alias_version(reg, CANDIDATE)
        if version is None:
            raise RegistryError(f"no version of {reg.name!r} holds {CANDIDATE!r}")
        held = _aliases_of(reg, str(version))
        if PRODUCTION in held:
            raise RegistryError(f"version {version} of {reg.name!r} is already production")
        steps = (
            [] if STAGING in held else [_promote_locked(reg, STAGING, str(version), False, reason)]
        )
        return [*steps, _promote_locked(reg, PRODUCTION, str(version), False, reason)]


def _promote_locked(
    reg: Registry, target: str, version: str | None, force: bool, reason: str | None
) -> PromotionResult:
    previous_stage = {STAGING: CANDIDATE, PRODUCTION: STAGING}.get(target)
    if version is None:
        version = _alias_version(reg, previous_stage) if previous_stage else None
        if version is None:
            raise RegistryError(
                f"no version of {reg.name!r} holds {previous_stage!r}; name the version to promote"
            )
    version = str(reg.client.get_model_version(reg.name, version).version)
    refusal = check_transition(target, _aliases_of(reg, version), force)
    if refusal:
        raise RegistryError(f"version {version} of {reg.name!r} cannot move to {target}: {refusal}")
    holder = _alias_version(reg, target)
    decision = None
    if target == PRODUCTION:
        decision = gate_decision(reg, version, holder)
        if not decision.promote and not force:
            _record(
                reg,
                version,
                _transition(
                    STAGING,
                    STAGING,
                    f"gate refused production: {decision.reason}",
                    refused=PRODUCTION,
                    gate=decision.to_dict(),
                ),
            )
            return PromotionResult(version, target, False, decision.reason, holder, decision)
    why = decision.reason if decision else f"promoted to {target}"
    if force and decision and not decision.promote:
        why = f"forced past the gate ({decision.reason})"
    if reason:
        why = f"{reason} ({why})"
    _retry(lambda: reg.client.set_registered_model_alias(reg.name, target, version))
    if _alias_version(reg, target) != version:  # re-read: the move must have stuck
        raise RegistryError(
            f"alias {target!r} of {reg.name!r} does not point at version "
            f"{version} after the move; another writer bypassed the lock"
        )
    held = _aliases_of(reg, version)
    for alias in STAGES[: STAGES.index(target)]:
        if alias in held:
            reg.client.delete_registered_model_alias(reg.name, alias)
    _record(
        reg,
        version,
        _transition(
            previous_stage if previous_stage in held else None,
            target,
            why,
            forced=force,
            replaced=holder,
            gate=decision.to_dict() if decision else None,
        ),
    )
    if holder and holder != version:
        _record(reg, holder, _transition(target, None, f"replaced by version {version}"))
    return PromotionResult(version, target, True, why, holder, decision)


# ----------------------------------------------------------------------------------------
# Listing and lineage
# ----------------------------------------------------------------------------------------


def _all_versions(reg: Registry, filter_string: str | None) -> list[Any]:
    versions, token = [], None
    while True:
        page = reg.client.search_model_versions(filter_string, max_results=200, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _alias_map(reg: Registry, name: str) -> dict[str, list[str]]:
    """version -> aliases. Uses the registered model's alias table plus
    ``get_model_version_by_alias`` for the stages (``search_model_versions`` omits aliases)."""
    found: dict[str, set[str]] = {}
    with contextlib.suppress(Exception):
        for alias, version in reg.client.get_registered_model(name).aliases.items():
            found.setdefault(str(version), set()).add(alias)
    for alias in STAGES:
        version = _alias_version(reg, alias, name)
        if version:
            found.setdefault(version, set()).add(alias)
    return {
        v: sorted(a, key=lambda x: (x not in STAGES, STAGES.index(x) if x in STAGES else 0, x))
        for v, a in found.items()
    }


SUMMARY_METRICS = (
    "leak_free.auroc",
    "leak_free.auprc",
    "leak_free.f1",
    "paper_compatible.auroc",
    "paper_compatible.f1",
)


def list_versions(reg: Registry) -> list[dict[str, Any]]:
    """Every version of the configured model, newest first: aliases, metrics, data."""
    with _errors(reg, f"listing versions of {reg.name!r}"):
        versions = _all_versions(reg, f"name='{reg.name}'")
        if not versions:
            return []
        aliases = _alias_map(reg, reg.name)
        rows = []
        for mv in sorted(versions, key=lambda m: int(m.version), reverse=True):
            metrics = reg.client.get_run(mv.run_id).data.metrics if mv.run_id else {}
            keys = dict.fromkeys((reg.cfg.gate_metric, *SUMMARY_METRICS))
            rows.append(
                {
                    "name": mv.name,
                    "version": str(mv.version),
                    "aliases": aliases.get(str(mv.version), []),
                    "created": _iso_ms(mv.creation_timestamp),
                    "run_id": mv.run_id,
                    "data_version": mv.tags.get(f"{TAG}data_version"),
                    "eval_data_version": mv.tags.get(f"{TAG}eval_data_version"),
                    "metrics": {k: metrics.get(k) for k in keys},
                }
            )
        return rows


def _iso_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def resolve_version(reg: Registry, ref: str) -> Any:
    """A ModelVersion from ``models:/name@alias``, ``models:/name/N``, ``N`` or an alias."""
    name, rest = reg.name, ref
    if ref.startswith("models:/"):
        rest = ref.removeprefix("models:/")
        if "@" in rest:
            name, rest = rest.split("@", 1)
            rest = "@" + rest
        elif "/" in rest:
            name, rest = rest.split("/", 1)
        else:
            raise RegistryError(
                f"{ref}: expected models:/<name>@<alias> or models:/<name>/<version>"
            )
    with _errors(reg, f"resolving {ref}"):
        alias = rest.removeprefix("@")
        if rest.startswith("@") or not rest.isdigit():
            try:
                return reg.client.get_model_version_by_alias(name, alias)
            except Exception as exc:  # noqa: BLE001
                if _not_found(exc):
                    raise RegistryError(
                        f"{ref}: no version of {name!r} holds alias {alias!r}"
                    ) from None
                raise
        try:
            return reg.client.get_model_version(name, rest)
        except Exception as exc:  # noqa: BLE001
            if _not_found(exc):
                raise RegistryError(f"{ref}: model {name!r} has no version {rest}") from None
            raise


def _json_tag(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def lineage(reg: Registry, ref: str) -> dict[str, Any]:
    """Everything a version came from: data, validation, code, params, metrics, runs."""
    mv = resolve_version(reg, ref)
    with _errors(reg, f"reading the lineage of {ref}"):
        run = reg.client.get_run(mv.run_id)
        tags = run.data.tags
        parents, parent_id, seen = [], tags.get("mlflow.parentRunId"), {run.info.run_id}
        while parent_id and parent_id not in seen:
            seen.add(parent_id)
            parent = reg.client.get_run(parent_id)
            parents.append(
                {"run_id": parent_id, "name": parent.info.run_name, "status": parent.info.status}
            )
            parent_id = parent.data.tags.get("mlflow.parentRunId")
        aliases = _alias_map(reg, mv.name).get(str(mv.version), [])
        inputs = [
            {
                "name": di.dataset.name,
                "digest": di.dataset.digest,
                "source": di.dataset.source,
                "source_type": di.dataset.source_type,
                "tags": {t.key: t.value for t in di.tags},
            }
            for di in (run.inputs.dataset_inputs if run.inputs else [])
        ]
    transitions = [
        json.loads(v) | {"seq": k.rsplit(".", 1)[1]}
        for k, v in sorted(mv.tags.items())
        if k.startswith(TRANSITION_TAG)
    ]
    return {
        "model": {
            "name": mv.name,
            "version": str(mv.version),
            "aliases": aliases,
            "source": mv.source,
            "created": _iso_ms(mv.creation_timestamp),
            "transitions": transitions,
        },
        "data": {
            "data_version": tags.get(f"{TAG}data_version"),
            "dvc_md5": tags.get(f"{TAG}dvc_md5"),
            "manifest_sha256": tags.get(f"{TAG}manifest_sha256"),
            "source_sha256": tags.get(f"{TAG}source_sha256"),
            "source": tags.get(f"{TAG}data_source"),
            "counts": _json_tag(tags.get(f"{TAG}data_counts")),
            "used_counts": _json_tag(tags.get(f"{TAG}used_counts")),
            "eval_data_version": tags.get(f"{TAG}eval_data_version"),
            "inputs": inputs,
        },
        "validation": _json_tag(tags.get(f"{TAG}validation")),
        "code": {
            "git_commit": tags.get(f"{TAG}git_commit"),
            "git_dirty": tags.get(f"{TAG}git_dirty"),
            "dvc_lock_sha256": tags.get(f"{TAG}dvc_lock_sha256"),
        },
        "params": dict(sorted(run.data.params.items())),
        "metrics": dict(sorted(run.data.metrics.items())),
        "run": {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "start": _iso_ms(run.info.start_time),
            "end": _iso_ms(run.info.end_time),
            "artifact_uri": run.info.artifact_uri,
            "run_folder": tags.get(f"{TAG}run_folder"),
        },
        "parents": parents,
    }


_DATA_KEYS = ("data_version", "dvc_md5", "manifest_sha256", "source_sha256", "eval_data_version")


def versions_for_data(reg: Registry, digest: str) -> list[dict[str, Any]]:
    """Every registered version (of any model) trained or evaluated on a data version.

    ``digest`` is a DVC md5, manifest sha256, archive sha256 or evaluation-data digest,
    or a prefix of one (at least 6 characters).
    """
    digest = digest.strip().lower()
    if len(digest) < 6:
        raise RegistryError(f"--data {digest!r}: give at least 6 characters of the hash")
    with _errors(reg, f"searching versions trained on {digest}"):
        rows, aliases = [], {}
        for mv in _all_versions(reg, None):
            matched = [
                k for k in _DATA_KEYS if (mv.tags.get(f"{TAG}{k}") or "").lower().startswith(digest)
            ]
            if not matched:
                continue
            if mv.name not in aliases:
                aliases[mv.name] = _alias_map(reg, mv.name)
            rows.append(
                {
                    "name": mv.name,
                    "version": str(mv.version),
                    "aliases": aliases[mv.name].get(str(mv.version), []),
                    "run_id": mv.run_id,
                    "created": _iso_ms(mv.creation_timestamp),
                    "matched": matched,
                    **{k: mv.tags.get(f"{TAG}{k}") for k in _DATA_KEYS},
                }
            )
    return sorted(rows, key=lambda r: (r["name"], -int(r["version"])))


# ----------------------------------------------------------------------------------------
# Using a registered model
# ----------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nestad" / "models"


def resolve_model_uri(uri: str | Path, root: Path | None = None) -> Path:
    """A local ``detector.pt`` for a model reference.

    Local paths pass through unchanged. ``models:/<name>@<alias>``, ``models:/<name>/<N>``
    and ``models:/m-<id>`` are downloaded once into ``~/.cache/nestad/models/<model id>``
    (logged models never change); the tracking store is the one ``params.yaml`` in ``root``
    (default: the current folder) names. The file is then loaded with ``weights_only=True``
    like any other, so a downloaded artefact is never unpickled.
    """
    text = str(uri)
    if not text.startswith("models:/"):
        return Path(uri)
    root = Path(root or Path.cwd())
    params = load_params(root / "params.yaml")
    reg = open_registry(params.registry, root)
    mlflow = _mlflow(reg.cfg)
    ref = text.removeprefix("models:/")
    with _errors(reg, f"resolving {text}"):
        if ref.startswith("m-") and "/" not in ref and "@" not in ref:
            model_id = ref
        else:
            mv = resolve_version(reg, text)
            source = str(mv.source)
            model_id = (
                source.removeprefix("models:/")
                if source.startswith("models:/m-")
                else hashlib.sha256(source.encode()).hexdigest()[:32]
            )
            text = f"models:/{mv.name}/{mv.version}"
        target = _cache_dir() / model_id
        detector = target / "artifacts" / "detector.pt"
        if not detector.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=target.parent))
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(tmp))
                if not (tmp / "artifacts" / "detector.pt").is_file():
                    raise RegistryError(f"{text}: not a nestad model (no artifacts/detector.pt)")
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return detector
