"""Registrations killed part-way: marked while they run, undone by the next registration.

``versions._create_version`` creates a version carrying the tag ``nestad.registering``
(which process registers it, when, and which version held ``candidate`` before) and
removes the tag as its very last step. A version that still carries it was being
registered by a process that died (SIGKILL, power cut: no ``except`` ran to undo it),
unless that process still runs. The next registration undoes it as a failed one is undone
(the version deleted, ``candidate`` back where it was) and logs a warning; promotion
refuses a version that carries the tag. A registration counts as abandoned when its
process has ended on this machine (``liveness``) or it began more than
``registry.lock_ttl_s`` ago (another machine's).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

from components.decisions import CANDIDATE
from components.registry.client import TAG, Registry, _describe
from components.registry.liveness import process_ended, process_id

log = logging.getLogger(__name__)

REGISTERING_TAG = f"{TAG}registering"


def registering_tag(previous_candidate: str | None) -> dict[str, str]:
    """The marker a new version is created with."""
    return {REGISTERING_TAG: json.dumps({
        "process": process_id(), "host": socket.gethostname(), "at": time.time(),
        "previous_candidate": previous_candidate,
    })}


def _marker(mv: Any) -> dict[str, Any] | None:
    text = (mv.tags or {}).get(REGISTERING_TAG)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    return info if isinstance(info, dict) else {}


def unfinished(mv: Any) -> bool:
    """Whether version ``mv`` is still being registered, or was when its process died."""
    return _marker(mv) is not None


def _abandoned(mv: Any, ttl_s: float) -> bool:
    info = _marker(mv) or {}
    try:
        began = float(info.get("at", mv.creation_timestamp / 1000))
    except (TypeError, ValueError):
        began = 0.0
    return process_ended(info.get("process")) or time.time() - began > ttl_s


def repair_interrupted(reg: Registry) -> list[str]:
    """Undo every abandoned registration of ``reg``'s model; the versions undone."""
    client, name = reg.client, reg.name
    marked = [mv for mv in client.search_model_versions(f"name='{name}'")
              if unfinished(mv) and _abandoned(mv, reg.cfg.lock_ttl_s)]
    undone = []
    for mv in marked:
        version, previous = str(mv.version), (_marker(mv) or {}).get("previous_candidate")
        try:
            held = dict(client.get_registered_model(name).aliases)
            client.delete_model_version(name, version)  # its aliases go with it
            restored = ""
            if held.get(CANDIDATE) == version and previous:
                client.set_registered_model_alias(name, CANDIDATE, str(previous))
                restored = f"; {CANDIDATE!r} is version {previous} again"
        except Exception as exc:  # noqa: BLE001 - undone meanwhile by another run
            log.debug("undoing version %s of %r: %s", version, name, _describe(exc))
            continue
        log.warning("undid the registration of version %s of %r (run %s): it was killed "
                    "part-way%s", version, name, mv.run_id, restored)
        undone.append(version)
    return undone
