"""Checkpoint files: atomic writes and weights-only loading with a format tag."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from components.errors import ModelFileError

CHECKPOINT_FORMAT = "nestad-checkpoint/1"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync it, then rename over ``path`` and fsync the
    folder: a killed process (or a power cut) leaves the old file or the new, never half
    of one (tests/reliability/test_sigkill.py kills it mid-write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def load_state_file(path: Path, fmt: str, what: str, missing: str) -> dict[str, Any]:
    """Load a nestad file with ``weights_only=True`` (tensors and plain containers only)
    and check its ``format`` tag; a clear ModelFileError otherwise."""
    if not path.is_file():
        raise ModelFileError(f"{path}: {missing}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ModelFileError(f"{path}: not a readable nestad {what} ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ModelFileError(f"{path}: not a nestad {what} ({fmt})")
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint (``last.pt`` or ``best.pt``)."""
    return load_state_file(path, CHECKPOINT_FORMAT, "checkpoint", "no such checkpoint")
