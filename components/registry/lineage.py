"""Reading the registry back: every version with its aliases and figures, everything a
version came from (data, validation, code, params, metrics, parent runs), and which
versions were trained or evaluated on a given data version."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

from components.decisions import (
    STAGES,
)
from components.registry.client import (
    TAG,
    TRANSITION_TAG,
    Registry,
    RegistryError,
    _alias_version,
    _errors,
    _not_found,
)


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
