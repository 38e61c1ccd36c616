"""Promotion: move an alias under a cross-process lock, through the gate.

``components.decisions`` decides (``decide_promotion``, ``check_transition``); this module
applies the decision: it holds the promotion lock (a registered model used as a mutex),
moves the alias, re-reads it, and records the transition on the versions involved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from components.decisions import (
    CANDIDATE,
    PRODUCTION,
    STAGES,
    STAGING,
    GateDecision,
    VersionFigures,
    check_transition,
    decide_promotion,
)
from components.registry.client import (
    TAG,
    Registry,
    RegistryError,
    _alias_version,
    _describe,
    _error_code,
    _errors,
    _not_found,
    _retry,
)
from components.registry.interrupted import REGISTERING_TAG, unfinished
from components.registry.liveness import process_ended, process_id
from components.registry.versions import _actor, _record, _transition

log = logging.getLogger(__name__)


LOCK_SUFFIX = ".promotion-lock"  # registered model used as a cross-process mutex


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
    one process holds it. A lock older than ``lock_ttl_s``, or whose holder no longer runs
    (a process of this machine: ``liveness``), was abandoned and is taken over.
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
                        **({"process": me} if (me := process_id()) else {}),
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
    """Delete the lock if its holder took it more than ``lock_ttl_s`` ago, or if the holder
    was a process of this machine that has ended (killed while holding it).

    A lock read without its tags (released and re-taken between two reads) is not stale;
    the token is re-read just before deleting, so a lock taken over meanwhile survives.
    """
    try:
        held = reg.client.get_registered_model(lock)
        token, since = held.tags.get("token"), held.tags.get("acquired_at")
        ended = process_ended(held.tags.get("process"))
        if not token or not since:
            return False
        if not ended and time.time() - float(since) <= reg.cfg.lock_ttl_s:
            return False
        if reg.client.get_registered_model(lock).tags.get("token") != token:
            return False
        log.warning(
            "taking over promotion lock %r abandoned by %s %.0fs ago (%s)",
            lock,
            held.tags.get("holder"),
            time.time() - float(since),
            f"process {held.tags.get('pid')} has ended" if ended
            else f"older than registry.lock_ttl_s={reg.cfg.lock_ttl_s:g}",
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
    mv = reg.client.get_model_version(reg.name, version)
    version = str(mv.version)
    if unfinished(mv):  # a registration still running, or killed part-way
        raise RegistryError(
            f"version {version} of {reg.name!r} is not fully registered (tag "
            f"{REGISTERING_TAG}); the next `nestad register` undoes it if its process died"
        )
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
