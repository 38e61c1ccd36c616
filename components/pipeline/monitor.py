"""``nestad monitor``: score a batch of new production images and compare it with the
model's reference (its validation normals); write a report, log it, judge it.

Reads a folder, an archive or an ``s3://bucket/prefix`` through the ingestion sources
(``components.data.sources``; the ``ingest.s3_*`` settings apply), scores with the model
file's own detector (the path ``nestad score`` uses), compares with
``components.detector.drift`` and judges with ``components.decisions.should_retrain``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from components.config import Params
from components.data.images import ImageRules, decode_image_and_bands, to_model_input
from components.data.layout import IMAGE_SUFFIXES
from components.decisions import DriftVerdict, should_retrain
from components.detector.drift import REPORT_FORMAT, compare_batch
from components.detector.package import MODEL_FILE, load_detector
from components.errors import DataError, ModelFileError

DRIFT_EXIT_CODE = 3  # past a monitor.* limit; bad input stays 2
REPORT_JSON, REPORT_MD = "monitor.json", "monitor.md"


@dataclass(frozen=True)
class MonitorResult:
    """The report (figures, verdict, what was compared), where it went, the MLflow run."""

    report: dict[str, Any]
    verdict: DriftVerdict
    json_path: Path
    markdown_path: Path
    run_id: str | None = None


def model_file(model: str | Path) -> Path:
    """``detector.pt`` of a model file, a ``model/`` folder or a run folder."""
    path = Path(model)
    for candidate in (path, path / MODEL_FILE, path / "model" / MODEL_FILE):
        if candidate.is_file():
            return candidate
    raise ModelFileError(f"{path}: no model file (expected {MODEL_FILE}, a model/ folder or "
                         "a run folder; run `nestad evaluate` first)")


def read_batch(source: str, params: Params) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image file under a folder, archive or s3:// prefix."""
    from components.data.sources.dispatch import _open_source

    src = _open_source(source, params.ingest, None)
    try:
        entries = [e for e in src.entries()
                   if PurePosixPath(e.rel).suffix.lower() in IMAGE_SUFFIXES]
        if not entries:
            raise DataError(f"{source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [(f"{src.uri}/{e.where}", data) for e, data in src.read(entries)]
    finally:
        src.close()


def _decode(items: list[tuple[str, bytes]], size: int, channels: int, rules: ImageRules
            ) -> tuple[torch.Tensor, list[tuple[int, int]], list[int]]:
    """uint8 (N, C, size, size) model inputs, source (width, height) and band counts, by
    the image rules the model was trained with (what training refused is refused)."""
    arrays, sizes, bands = [], [], []
    for name, data in items:
        array, source_size, band_count = decode_image_and_bands(data, name, size, channels,
                                                                rules)  # (H, W, C)
        arrays.append(array)
        sizes.append(source_size)
        bands.append(band_count)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, sizes, bands


def monitor_batch(params: Params, source: str, model: str | Path, out_dir: Path,
                  root: Path | None = None, track: bool | None = None,
                  model_ref: str | None = None) -> MonitorResult:
    """Score ``source``'s images with ``model``, compare with its reference, judge against
    ``params.monitor``, write ``out_dir/monitor.json`` and ``monitor.md``; log an MLflow run
    when ``track`` (default ``monitor.track``). Raises ``DataError`` for a batch smaller
    than ``monitor.min_images`` and ``ModelFileError`` for a model without a reference."""
    cfg = params.monitor
    file = model_file(model)
    detector, meta = load_detector(file)
    reference = meta.get("monitoring_reference") or {}
    if not reference.get("scores"):
        raise ModelFileError(f"{file}: no monitoring reference (evaluated before `nestad "
                             "monitor` existed); run `nestad evaluate` again")
    items = read_batch(source, params)
    if len(items) < cfg.min_images:
        raise DataError(f"{source}: {len(items)} images, fewer than monitor.min_images="
                        f"{cfg.min_images}; the distribution tests need a larger batch")
    images, sizes, bands = _decode(items, meta["image_size"], meta["channels"],
                                   meta["image_rules"])
    scores, flagged = [], []
    batch = params.evaluate.batch_size
    for start in range(0, len(images), batch):
        score, _, is_anomaly = detector(to_model_input(images[start : start + batch]))
        scores.append(score.numpy())
        flagged.append(is_anomaly.numpy())
    figures = compare_batch(reference, np.concatenate(scores), np.concatenate(flagged),
                            images.numpy(), sizes, bands, cfg.psi_bins)
    verdict = should_retrain(figures, cfg)
    report = {
        **figures,
        "source": source,
        "model": model_ref or str(file),
        "model_provenance": meta.get("provenance", {}),
        "limits": cfg.model_dump(exclude={"report_dir", "track"}),
        "verdict": {"drift": verdict.retrain, "exceeded": list(verdict.exceeded),
                    "reasons": list(verdict.reasons)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / REPORT_JSON, out_dir / REPORT_MD
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    run_id = None
    if cfg.track if track is None else track:
        from components.registry.monitoring import log_monitoring

        run_id = log_monitoring(params, root or Path.cwd(), report, [json_path, md_path])
    return MonitorResult(report, verdict, json_path, md_path, run_id)


def render_markdown(report: dict[str, Any]) -> str:
    """A short human-readable page of a monitoring report."""
    s, f, im = report["score"], report["flagged"], report["image"]
    v = report["verdict"]
    lines = [
        "# Monitoring report",
        "",
        f"- batch: `{report['source']}` ({report['images']} images)",
        f"- model: `{report['model']}`; reference: {report['reference_images']} validation "
        "normals",
        f"- verdict: **{'DRIFT' if v['drift'] else 'ok'}**"
        + (f" ({'; '.join(v['reasons'])})" if v["reasons"] else ""),
        "",
        "| figure | batch | reference | limit |",
        "| --- | --- | --- | --- |",
        f"| score KS statistic / p-value | {s['ks_statistic']:.4f} / {s['ks_pvalue']:.3g} | "
        f"- | p >= {report['limits']['min_ks_pvalue']:g} |",
        f"| score PSI ({s['psi_bins']} quantile bins) | {s['psi']:.4f} | 0 | "
        f"<= {report['limits']['max_psi']:g} |",
        f"| median raw score | {s['batch_median']:.4g} | {s['reference_median']:.4g} | - |",
        f"| flagged at {f['which']} threshold {f['threshold']:.4f} | {f['fraction']:.3f} "
        f"({f['count']}) | {f['reference_fraction']:.3f} | "
        f"<= {report['limits']['max_flagged_fraction']:g} |",
        f"| mean brightness (0-255) | {im['brightness']['batch_mean']:.1f} | "
        f"{im['brightness']['reference_mean']:.1f} | shift <= "
        f"{report['limits']['max_brightness_shift']:g} |",
        f"| mean contrast (std, 0-255) | {im['contrast']['batch_mean']:.1f} | "
        f"{im['contrast']['reference_mean']:.1f} | change <= "
        f"{report['limits']['max_contrast_change']:g} |",
        f"| share of sizes outside training range | {im['size_mismatch']:.3f} | "
        f"{im['reference_width']} x {im['reference_height']} | "
        f"<= {report['limits']['max_size_mismatch']:g} |",
        f"| share of unseen band counts | {im['channel_mismatch']:.3f} "
        f"(seen {im['channels_seen']}) | {im['reference_channels'] or 'unknown'} | "
        f"<= {report['limits']['max_channel_mismatch']:g} |",
        "",
    ]
    return "\n".join(lines)


def read_verdict(path: Path, params: Params) -> DriftVerdict:
    """The verdict of a saved report (``monitor.json``), judged again with ``params``'
    ``monitor.*`` limits (the retraining flow's trigger); ``DataError`` if unreadable."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"{path}: cannot read the monitoring report ({exc.strerror})") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a monitoring report (invalid JSON: {exc})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise DataError(f"{path}: not a monitoring report (no format {REPORT_FORMAT!r})")
    return should_retrain(report, params.monitor)
