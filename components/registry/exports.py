"""The verified exports a registered version carries: ``RUN/export/<format>/`` folders made
by ``nestad export RUN``, checked again (equivalence passed, files unaltered, exported from
this run's ``detector.pt``) before anything is logged; they are logged beside the pyfunc
model, under its ``artifacts/export/<format>/``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.export.locate import default_export_dir
from components.export.metadata import BACKENDS, ExportError, read_metadata, sha256_file
from components.registry.client import TAG, RegistryError

EXPORT_ARTIFACT = "export"  # key (and folder) of the exports in the pyfunc's artifacts


def verified_exports(out: Path) -> dict[str, Path]:
    """backend -> export folder of every export in run folder ``out``; ``RegistryError``
    when one is altered, failed its check, or was made from another ``detector.pt``."""
    detector = sha256_file(Path(out) / "model" / "detector.pt")
    found = {}
    for backend in BACKENDS:
        folder = default_export_dir(out, backend)
        if not folder.exists():
            continue
        try:
            meta = read_metadata(folder, backend)
        except ExportError as exc:
            raise RegistryError(f"{exc}; nothing registered") from None
        if meta["model"].get("sha256") != detector:
            raise RegistryError(f"{folder}: exported from another detector.pt than "
                                f"{Path(out) / 'model' / 'detector.pt'}; run `nestad export "
                                f"{out} --format {backend}` again")
        found[backend] = folder
    return found


def stage_exports(exports: dict[str, Path], tmp: Path) -> Path:
    """Copy the exports' listed files into ``tmp/export/<backend>/`` (nothing else there,
    e.g. no leftovers); that folder is the pyfunc artifact."""
    root = Path(tmp) / EXPORT_ARTIFACT
    for backend, folder in exports.items():
        target = root / backend
        target.mkdir(parents=True)
        meta = json.loads((folder / "metadata.json").read_text())
        for name in [*meta["files"], "metadata.json"]:
            shutil.copy2(folder / name, target / name)
    return root


def export_files(exports: dict[str, Path]) -> dict[str, int]:
    """``artifacts/export/<backend>/<file>`` -> size, for checking the logged model."""
    sizes = {}
    for backend, folder in exports.items():
        meta = json.loads((folder / "metadata.json").read_text())
        for name in [*meta["files"], "metadata.json"]:
            sizes[f"artifacts/{EXPORT_ARTIFACT}/{backend}/{name}"] = (folder / name).stat().st_size
    return sizes


def export_tags(exports: dict[str, Path]) -> dict[str, str]:
    """``nestad.export.<backend>``: the check's figures and the main file's sha256."""
    tags = {}
    for backend, folder in exports.items():
        meta = json.loads((folder / "metadata.json").read_text())
        eq = meta["equivalence"]
        tags[f"{TAG}export.{backend}"] = json.dumps({
            "file": meta["main_file"], "sha256": meta["files"][meta["main_file"]],
            "checked_on": eq["images_from"], "images": eq["images"],
            "tolerance": eq["tolerance"], "max_abs": eq["max_abs"]})
    return tags
