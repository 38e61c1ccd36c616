"""Where an export lives: ``find_export`` turns what ``--model`` names into the folder of
its ``onnx`` or ``openvino`` export.

Layouts: an export folder itself (``metadata.json``); a folder of exports
(``<dir>/<backend>/``); a run folder (``<run>/export/<backend>/``, where ``nestad export``
writes by default); a model folder or ``detector.pt`` whose parent holds ``export/``
(``<run>/model``, and a registered model downloaded from the registry, whose
``artifacts/`` holds ``detector.pt`` and ``export/``).
"""

from __future__ import annotations

from pathlib import Path

from components.export.metadata import METADATA_FILE, ExportError

EXPORT_DIR = "export"  # <run folder>/export/<backend>/ and <model artifacts>/export/<backend>/


def default_export_dir(run_folder: Path, backend: str) -> Path:
    return Path(run_folder) / EXPORT_DIR / backend


def candidate_dirs(model: Path, backend: str) -> list[Path]:
    model = Path(model)
    base = model.parent if model.is_file() else model
    found = [base, base / backend, base / EXPORT_DIR / backend,
             base.parent / EXPORT_DIR / backend]
    return list(dict.fromkeys(found))


def find_export(model: Path, backend: str) -> Path:
    """The ``backend`` export folder for ``model``; ``ExportError`` naming where it looked."""
    candidates = candidate_dirs(model, backend)
    for folder in candidates:
        if (folder / METADATA_FILE).is_file():
            return folder
    raise ExportError(f"{model}: no {backend} export (looked in "
                      f"{', '.join(str(c) for c in candidates)}); run `nestad export "
                      f"RUN --format {backend}` first")
