"""The MLflow client: connecting, retries, and failures turned into one ``RegistryError``.

Store: ``registry.tracking_uri`` when set, else ``$MLFLOW_TRACKING_URI``, else an embedded
SQLite store ``sqlite:///<project>/mlflow.db`` with artefacts in ``<project>/mlartifacts``.
Server requests are retried ``registry.http_max_retries`` times with exponential backoff,
then fail with one clear ``RegistryError``. ``mlflow`` is imported, and its environment
set, inside the functions that need it: nothing happens at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import (
    RegistryConfig,
)
from components.errors import NestadError

log = logging.getLogger(__name__)


TAG = "nestad."
TRANSITION_TAG = f"{TAG}transition."
_QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class RegistryError(NestadError):
    """The tracking server or registry failed, or holds something unexpected."""


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
    """``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in ``root``.

    A bare ``postgresql://`` names the psycopg2 driver nestad installs: SQLAlchemy 2.1
    would pick psycopg 3, which is not installed."""
    uri = (
        cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    )
    if uri.startswith("postgresql://"):
        uri = "postgresql+psycopg2://" + uri.removeprefix("postgresql://")
    return uri


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
    """Retry a call that lost a write race: on SQLite "database is locked" or a duplicate
    key from a concurrent upsert; on PostgreSQL the same duplicate key (two alias writes at
    once, which an MLflow server answers 400). HTTP failures are retried by MLflow itself."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            transient = any(sign in text for sign in (
                "database is locked", "UNIQUE constraint",  # SQLite
                "duplicate key value violates unique constraint"))  # PostgreSQL
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
    elif location is None and reg.uri.startswith(("postgresql", "mysql", "mssql")):
        # A shared database without a server: artefacts would land in ./mlruns of
        # whichever host wrote them; make the shared place explicit.
        raise RegistryError(
            f"registry.tracking_uri is a database ({reg.uri.split('://')[0]}://...): set "
            "registry.artifact_location to a shared store (e.g. s3://bucket/mlflow), or "
            "run `mlflow server --artifacts-destination ...` and point tracking_uri at it"
        )
    try:
        return reg.client.create_experiment(reg.cfg.experiment, artifact_location=location)
    except Exception as exc:  # noqa: BLE001 - created concurrently by another process
        exp = reg.client.get_experiment_by_name(reg.cfg.experiment)
        if exp is None:
            raise
        log.debug("experiment created concurrently: %s", exc)
        return exp.experiment_id


def _alias_version(reg: Registry, alias: str, name: str | None = None) -> str | None:
    """The version holding ``alias``, or None."""
    try:
        return str(reg.client.get_model_version_by_alias(name or reg.name, alias).version)
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc):
            return None
        raise
