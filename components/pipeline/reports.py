"""The stages' inspection reports: what an evaluation and a scored batch hand to
``components.report``, with the model and data versions they came from.

An evaluation writes ``out/report/index.html`` (``nestad register`` logs the folder with
the run); ``nestad score --report DIR`` writes ``DIR/index.html``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.config import Params
from components.data.images import to_model_input
from components.data.splits import ImageSet
from components.detector.evaluate import EvaluationReport, normalise
from components.detector.package import MODEL_FILE
from components.report.inspection import (
    ScoredImages,
    named_thresholds,
    write_batch_report,
    write_evaluation_report,
)

REPORT_DIR = "report"  # in a run folder, beside metrics.json
IMAGES_PER_GROUP = 48  # cards per gallery group (false positives, false negatives, ...)


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _code(root: Path) -> str:
    from components.registry.provenance import code_version

    code = code_version(root)
    if not code["git_commit"]:
        return "not a git checkout"
    return code["git_commit"] + (" (uncommitted changes)" if code["git_dirty"] == "true" else "")


def _data_version(source: str, root: Path, test_scores: Path) -> list[tuple[str, str]]:
    from components.registry.provenance import describe_data, eval_data_digest

    data = describe_data(source, root)
    kind = ("DVC md5 of data/" if data.dvc_md5 else "sha256 of manifest.csv"
            if data.manifest_sha256 else "sha256 of the archive" if data.source_sha256 else "")
    version = f"{data.key} ({kind})" if data.key else "unversioned (a folder without manifest)"
    digest = eval_data_digest(data, test_scores) if test_scores.is_file() else None
    return [("data source", data.source), ("data version", version),
            ("evaluation set", digest or "- (unversioned data)")]


def _images_hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, C, H, W) -> (N, H, W, C)


def evaluation_report(params: Params, out: Path, test_set: ImageSet, test_scores: np.ndarray,
                      test_maps01: np.ndarray, val_scores: np.ndarray,
                      report: EvaluationReport, root: Path | None = None) -> Path:
    """``out/report/index.html`` of an evaluation; call after metrics.json, test_scores.csv
    and the model file are written. ``test_maps01``: the test maps normalised to [0, 1]."""
    root = Path(root or Path.cwd())
    norm = report.norm
    normed = normalise(test_scores, norm.score_min, norm.score_max, clip=False)
    model_file = out / "model" / MODEL_FILE
    masks = test_set.masks
    scored = ScoredImages(
        names=list(test_set.paths), images=_images_hwc(test_set.images), scores=normed,
        raw_scores=np.asarray(test_scores), flagged=normed >= norm.threshold(
            params.evaluate.threshold),
        maps=lambda idx: np.asarray(test_maps01)[idx], labels=list(test_set.labels),
        is_anomaly=np.asarray(test_set.is_anomaly),
        masks=None if masks is None or not np.asarray(masks).any() else np.asarray(masks))
    versions = [
        ("model", f"{params.model.name}, {params.data.channels} channel(s), "
                  f"{params.data.image_size} px input, checkpoint epoch "
                  f"{report.checkpoint_epoch}"),
        ("model file", f"{model_file} (sha256 {_sha256(model_file)})"
         if model_file.is_file() else "not written"),
        ("registered version", "none yet: `nestad register` logs this report with the run"),
        *_data_version(params.data.source, root, out / "test_scores.csv"),
        ("code", _code(root)),
        ("generated", _now()),
    ]
    return write_evaluation_report(out / REPORT_DIR, scored, report.to_json(), versions,
                                   val_scores=normalise(val_scores, norm.score_min,
                                                        norm.score_max, clip=False),
                                   per_group=IMAGES_PER_GROUP,
                                   title=f"nestad inspection report: evaluation of "
                                         f"{params.model.name} on {Path(params.data.source).name}")


def batch_thresholds(meta: dict[str, Any], threshold: str | None
                     ) -> tuple[dict[str, float], str]:
    """Both thresholds by display name and the applied one, from a model file's metadata
    (``norm``, ``threshold``) or an export's (``thresholds``)."""
    if "norm" in meta:
        norm = meta["norm"]
        norm = norm if isinstance(norm, dict) else asdict(norm)
        return named_thresholds(norm, threshold or meta["threshold"])
    stored = meta["thresholds"]
    norm = {"threshold_fixed": stored["fixed"], "threshold_fpr": stored["fpr"],
            "target_fpr": stored["target_fpr"]}
    return named_thresholds(norm, threshold or stored["used"])


def _model_name(meta: dict[str, Any]) -> str:
    model = meta.get("model") or {}
    return str(model.get("name") or model.get("generator") or "?")


def batch_report(folder: Path, detector: Any, meta: dict[str, Any], model_file: Path,
                 images: torch.Tensor, rows: list[dict[str, Any]], threshold: str | None,
                 batch_size: int = 256) -> Path:
    """``folder/index.html`` for scored new images: ``rows`` as ``score_paths`` returns them
    for ``images`` (N, C, H, W) uint8, scored by ``detector`` (its maps are recomputed for
    the images shown only)."""
    thresholds, chosen = batch_thresholds(meta, threshold)

    @torch.no_grad()
    def maps(idx: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(idx), batch_size):
            x = to_model_input(images[torch.from_numpy(idx[start : start + batch_size])])
            parts.append(detector.score_with_maps(x)[3][:, 0].numpy())  # (B, h, w)
        return np.concatenate(parts)

    path = Path(model_file)
    path = path / MODEL_FILE if path.is_dir() and (path / MODEL_FILE).is_file() else path
    exported = meta.get("model") if "main_file" in meta else None  # an export's metadata
    provenance = meta.get("provenance") or exported or {}
    versions = [
        ("model", f"{_model_name(meta)}, {meta.get('channels')} "
                  f"channel(s), {meta.get('image_size')} px input, checkpoint epoch "
                  f"{provenance.get('checkpoint_epoch', '?')}"),
        ("model file", f"{path} (sha256 {_sha256(path)})" if path.is_file() else str(path)),
        *([("export", f"{meta.get('backend')} {meta['main_file']} (sha256 "
                      f"{meta.get('files', {}).get(meta['main_file'])}) of {exported.get('source')}"
                      f" (sha256 {exported.get('sha256')})")] if exported else []),
        ("training data", str(provenance.get("data_source") or meta.get("data_version")
                           or "unknown")),
        ("generated", _now()),
    ]
    scored = ScoredImages(
        names=[r["path"] for r in rows], images=_images_hwc(images),
        scores=np.array([r["normalised_score"] for r in rows], dtype=np.float64),
        raw_scores=np.array([r["score"] for r in rows], dtype=np.float64),
        flagged=np.array([bool(r["is_anomaly"]) for r in rows]), maps=maps)
    return write_batch_report(folder, scored, thresholds, chosen, versions,
                              per_group=IMAGES_PER_GROUP)
