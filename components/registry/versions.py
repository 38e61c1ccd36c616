"""Registration: an evaluated run folder becomes a new ``candidate`` version, or nothing.

A version is registered only after every artefact is logged and verified; if
registration fails part-way, the half-made version is deleted and aliases restored; one
killed part-way (no ``except`` ran) is undone by the next registration (``interrupted``).
Each alias move is recorded as a ``nestad.transition.NNN`` version tag (who, when, why,
figures compared).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.config import (
    Params,
)
from components.decisions import (
    CANDIDATE,
)
from components.registry.client import (
    TAG,
    TRANSITION_TAG,
    Registry,
    RegistryError,
    _alias_version,
    _describe,
    _error_code,
    _errors,
    _retry,
    open_registry,
)
from components.registry.exports import export_tags, verified_exports
from components.registry.interrupted import (
    REGISTERING_TAG,
    registering_tag,
    repair_interrupted,
)
from components.registry.provenance import describe_data, eval_data_digest
from components.registry.pyfunc import log_pyfunc
from components.registry.runs import _log_batch, log_run_folder, start_run

log = logging.getLogger(__name__)


_RUN_FILES = ("metrics.json", "train_history.json", "test_scores.csv", "model/detector.pt")


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
    from components.detector.package import load_detector

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
    registry is left as it was. Verified exports in ``out/export/<format>/`` (``nestad
    export``) are logged beside the pyfunc model, so the version carries them.
    """
    root, out = Path(root).resolve(), Path(out)
    check_run_folder(out, params)
    exports = verified_exports(out)  # RUN/export/<format>/, checked before anything is logged
    data = describe_data(params.data.source, root)
    eval_digest = eval_data_digest(data, out / "test_scores.csv")
    reg = open_registry(params.registry, root)
    run_id = run_id or start_run(reg, params, run_name or f"register {out.name}", parent_run_id)
    try:
        figures = log_run_folder(reg, run_id, out, params, data, eval_digest)
        model_uri, model_id = log_pyfunc(reg, run_id, out / "model" / "detector.pt", exports)
        with _errors(reg, f"finishing run {run_id}"):
            _log_batch(reg, run_id, tags={f"{TAG}model_uri": model_uri, **export_tags(exports)})
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
    version = _create_version(
        reg, model_uri, model_id, run_id, tags,
        describe=lambda number: _log_model_card(reg, run_id, number, params, out, data),
    )
    return RegisteredVersion(reg.name, version, run_id, model_uri, data.key, eval_digest, figures)


MODEL_CARD_ARTIFACT = "model_card/MODEL_CARD.md"


def _log_model_card(
    reg: Registry, run_id: str, version: str, params: Params, out: Path, data: Any
) -> str:
    """Render the version's model card, log it to the run; return the description."""
    from components.registry.model_card import CardFacts, card_description, render_model_card
    from components.registry.provenance import code_version

    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "train_history.json").read_text())
    facts = CardFacts(
        model_name=reg.name, version=version, run_id=run_id,
        data=params.data.model_dump(), data_version=data.key, data_counts=data.counts,
        used_counts={**history.get("counts", {}), **metrics.get("counts", {})},
        metrics=metrics, model=params.model.model_dump(), train=params.train.model_dump(),
        evaluate=params.evaluate.model_dump(), code=code_version(reg.root), history=history,
    )
    card = render_model_card(facts)
    reg.client.log_text(run_id, card, MODEL_CARD_ARTIFACT)
    return card_description(card, run_id)


def _create_version(
    reg: Registry, model_uri: str, model_id: str, run_id: str, tags: dict[str, str],
    describe: Callable[[str], str] | None = None,
) -> str:
    """Create the version and give it ``candidate`` (and ``describe(version)`` as its
    description, the model card); on failure undo both."""
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
        repair_interrupted(reg)  # what a killed registration left
        previous = _alias_version(reg, CANDIDATE)
    version = None
    try:
        with _errors(reg, f"registering a version of {name!r}"):
            marked = {**tags, **registering_tag(previous)}  # removed as the last step
            mv = client.create_model_version(
                name, source=model_uri, run_id=run_id, tags=marked, model_id=model_id
            )
            version = str(mv.version)
            _retry(lambda: client.set_registered_model_alias(name, CANDIDATE, version))
            if _alias_version(reg, CANDIDATE) != version:
                raise RegistryError(
                    f"alias {CANDIDATE!r} of {name!r} moved during "
                    f"registration of version {version}"
                )
            if describe is not None:
                text = describe(version)
                _retry(lambda: client.update_model_version(name, version, description=text))
            # complete: no later registration undoes it now
            _retry(lambda: client.delete_model_version_tag(name, version, REGISTERING_TAG))
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


def _record(reg: Registry, version: str, transition: str) -> None:
    """Append a transition tag to a version (best effort for bystander versions)."""
    try:
        mv = reg.client.get_model_version(reg.name, version)
        key = _next_transition_key(mv.tags)
        reg.client.set_model_version_tag(reg.name, version, key, transition)
    except Exception as exc:  # noqa: BLE001
        log.warning("transition of version %s not recorded (%s)", version, _describe(exc))
