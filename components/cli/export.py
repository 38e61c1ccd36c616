"""``nestad export MODEL --format onnx|openvino [--out DIR]``: a verified ONNX or OpenVINO
graph of a trained detector, with its metadata (``components.export``).

MODEL is a run folder (``nestad train --evaluate --out``), its ``model/`` folder or
``detector.pt``, or a registered model (``models:/<name>@<alias>``, ``models:/<name>/<N>``).
The equivalence check runs on the validation images of the data ``params.yaml`` names
(``--images`` for others; seeded synthetic images, said so, when neither is readable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from components.cli.common import ParamsOpt, ProfileOpt, SetOpt, console, friendly_errors

CHECK_IMAGES_MAX = 1000  # validation images compared, at most (the first, in split order)


def _local_model(model: str) -> tuple[Path, Path | None]:
    """(detector.pt, run folder or None) of a local MODEL."""
    path = Path(model)
    if (path / "model" / "detector.pt").is_file():
        return path / "model" / "detector.pt", path
    if (path / "detector.pt").is_file():
        return path / "detector.pt", path.parent
    if path.is_file():
        return path, path.parent.parent
    from components.export.metadata import ExportError

    raise ExportError(f"{model}: no such run folder or model file (expected "
                      f"{path / 'model' / 'detector.pt'})")


def _registered(model: str, root: Path) -> tuple[Path, dict[str, Any], str | None]:
    """Download a registered model: (detector.pt, model identity, data version)."""
    from components.config import load_params
    from components.registry.client import open_registry
    from components.registry.download import resolve_model_uri
    from components.registry.lineage import resolve_version

    detector = resolve_model_uri(model, root)
    reg = open_registry(load_params(root / "params.yaml").registry, root)
    mv = resolve_version(reg, model)
    info = {"source": model, "version": f"{mv.name}/{mv.version}"}
    return detector, info, (mv.tags or {}).get("nestad.data_version")


def _data_version(source: str | None, root: Path) -> str | None:
    from components.errors import NestadError
    from components.registry.provenance import describe_data

    if not source:
        return None
    try:
        return describe_data(source, root).key
    except (NestadError, OSError):
        return None


def _check_images(meta: dict[str, Any], images: list[Path] | None, cfg: Any):
    """uint8 (N, C, H, W) images for the equivalence check, and what they are."""
    from components.data.splits import load_images, load_splits
    from components.errors import NestadError
    from components.export.equivalence import synthetic_check_images

    size, channels = meta["image_size"], meta["channels"]
    if images:
        batch, names = load_images(images, size, channels, rules=meta.get("image_rules"))
        return batch, f"{len(names)} images from {', '.join(map(str, images))}"
    if (cfg.data.image_size, cfg.data.channels) != (size, channels):
        why = (f"params data is {cfg.data.image_size} px x {cfg.data.channels}, the model "
               f"{size} px x {channels}")
    else:
        try:
            val = load_splits(cfg.data, include=("val",)).val.images[:CHECK_IMAGES_MAX]
            return val, f"{len(val)} validation images of {cfg.data.source}"
        except NestadError as exc:
            why = str(exc)
    console.print(f"[yellow]notice:[/] no validation images ({escape(why)}); the check "
                  "runs on 32 seeded synthetic images", highlight=False, soft_wrap=True)
    return (synthetic_check_images(size, channels),
            f"32 seeded synthetic images (no validation images: {why})")


def export_cmd(
    model: Annotated[str, typer.Argument(help="Run folder, model folder or detector.pt, or "
                                         "models:/<name>@<alias> | models:/<name>/<N>.")],
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx | openvino.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Export folder (default: "
                                             "RUN/export/<format> for a run folder).")] = None,
    images: Annotated[list[Path] | None, typer.Option("--images", help="Images or folders "
                      "for the equivalence check (default: the validation images).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export a detector as one ONNX or OpenVINO graph (uint8 NHWC image -> score,
    normalised score, flag, anomaly map), verified against PyTorch before it is written."""
    from components.cli.common import _params

    cfg = _params(params, profile, set_)
    result = export_model(model, format_, out, images, cfg, params.absolute().parent)
    worst = ", ".join(f"{k} {v:.2g}" for k, v in result.report.max_abs.items())
    console.print(f"[green]{format_} export verified[/] on {result.report.images} images "
                  f"(max abs difference {worst}; tolerance {result.report.tolerance:g}) "
                  f"-> {result.folder}", highlight=False, soft_wrap=True)


def export_model(model: str, format_: str, out: Path | None, images: list[Path] | None,
                 cfg: Any, root: Path) -> Any:
    """Export and check MODEL (see ``export_cmd``); the ``ExportResult``."""
    from components.detector.package import load_detector
    from components.export.exporter import export_detector
    from components.export.locate import default_export_dir
    from components.export.metadata import BACKENDS, ExportError, sha256_file

    if format_ not in BACKENDS:
        raise ExportError(f"--format {format_!r}: expected one of {', '.join(BACKENDS)}")
    if model.startswith("models:/"):
        if out is None:
            raise ExportError(f"{model}: --out is needed for a registered model")
        detector_file, info, data_version = _registered(model, root)
    else:
        detector_file, run = _local_model(model)
        info = {"source": str(Path(model).resolve()), "version": None}
        out = out or default_export_dir(run, format_)
        data_version = None
    detector, meta = load_detector(detector_file)
    if data_version is None:  # the params' data, as `nestad register` records it
        data_version = (_data_version(cfg.data.source, root)
                        or _data_version(meta.get("provenance", {}).get("data_source"), root))
    info = {**info, "sha256": sha256_file(detector_file),
            "checkpoint_epoch": meta.get("provenance", {}).get("checkpoint_epoch")}
    batch, images_from = _check_images(meta, images, cfg)
    with console.status(f"exporting {format_} and checking it on {images_from}"):
        return export_detector(detector, meta, format_, out, batch, images_from, model=info,
                               data_version=data_version)


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``nestad`` app."""
    app.command("export")(friendly_errors(export_cmd))
