"""A local ``detector.pt`` for a model reference: local paths as they are, ``models:/...``
downloaded once into the user's cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from components.config import (
    load_params,
)
from components.registry.client import RegistryError, _errors, _mlflow, open_registry
from components.registry.lineage import resolve_version


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
