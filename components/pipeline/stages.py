"""Stage functions: each reads its inputs from disk, runs pure components, writes outputs.

The CLI, the DVC stages and the Prefect flows all call these, so a step does the same
thing whichever way it is run. Layout of a run folder ``out``:

    out/checkpoints/last.pt, best.pt   training state; the validation-chosen weights
    out/train_history.json             per-epoch losses and validation figures
    out/model/detector.pt              weights + normalisation statistics + thresholds
    out/metrics.json                   both protocols' figures
    out/plots/*.png                    ROC/PR, score histogram, reconstructions,
                                       overlays.png (highest-scoring test images + maps)
    out/test_scores.csv                one row per test image
    out/report/index.html              inspection report (static; pictures in report/images/)
    out/monitoring_reference.json      what ``nestad monitor`` compares new images with
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from components.config import Params
from components.data.images import image_rules, to_model_input
from components.data.splits import DatasetSplits, load_images, load_splits
from components.detector.distributed import DistContext
from components.detector.drift import build_reference
from components.detector.evaluate import (
    EvaluationReport,
    evaluate_scores,
    normalise,
    per_defect_figures,
    require_both_classes,
    write_metrics,
    write_plots,
)
from components.detector.map_metrics import (
    aupro,
    fit_map_stats,
    hot_normal_figures,
    normalise_maps,
    pixel_auroc,
)
from components.detector.overlay import overlay_grid
from components.detector.package import MODEL_FILE, build_detector, load_detector, save_detector
from components.detector.score import MapSettings, score_images
from components.detector.synthetic_validation import (
    choose_map_settings,
    make_synthetic_validation,
    synthetic_validation_report,
)
from components.detector.train import BatchStats, EpochReport, TrainResult, fit, load_checkpoint
from components.pipeline.reports import batch_report, evaluation_report
from components.runtime import resolve_runtime

MONITORING_REFERENCE = "monitoring_reference.json"  # beside metrics.json; also in detector.pt


def train_stage(params: Params, out: Path, splits: DatasetSplits | None = None,
                resume: bool = False,
                on_epoch: Callable[[EpochReport], None] | None = None,
                on_batch: Callable[[BatchStats], None] | None = None,
                dist: DistContext | None = None) -> TrainResult:
    """Train on the normal training images; keep the epoch chosen on validation normals.

    ``dist``: one process of a data-parallel run; rank 0 alone writes the history."""
    splits = splits or load_splits(params.data, include=("train", "val"))
    result = fit(splits.train, splits.val, params.model, params.train, out / "checkpoints",
                 score_weight=params.evaluate.score_weight, resume=resume,
                 on_epoch=on_epoch, on_batch=on_batch,
                 map_settings=map_settings(params), dist=dist)
    if dist is not None and not dist.is_main:
        return result
    history = {"best_epoch": result.best_epoch, "resumed_from": result.resumed_from,
               "device": str(result.runtime.device),
               "precision": "bf16" if result.runtime.amp_dtype else "fp32",
               "counts": {"train": len(splits.train), "val": len(splits.val)},
               **({"world_size": dist.world_size} if dist is not None else {}),
               "epochs": [asdict(h) for h in result.history]}
    (out / "train_history.json").write_text(json.dumps(history, indent=2) + "\n")
    return result


def map_settings(params: Params) -> MapSettings:
    """The map smoothing and map score of the ``evaluate`` section; an ``auto`` value is the
    default here (training) and chosen on the synthetic validation set by evaluation."""
    cfg = params.evaluate
    # before evaluation has chosen: light smoothing (the synthetic validation set of
    # magnetic tiles preferred sigma 0-1 to 2-4 for the restoration detector's maps)
    default = MapSettings(sigma=1.0, top_k=0.01)
    return MapSettings(sigma=default.sigma if cfg.map_sigma == "auto" else cfg.map_sigma,
                       top_k=default.top_k if cfg.map_top_k == "auto" else cfg.map_top_k)


def evaluate_stage(params: Params, out: Path, splits: DatasetSplits | None = None
                   ) -> EvaluationReport:
    """Fit normalisation on validation normals, score the sealed test split once, save all."""
    cfg = params.evaluate
    splits = splits or load_splits(params.data, include=("val", "test"))
    require_both_classes(splits.test.is_anomaly, params.data)  # before anything is written
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    channels, size = params.data.channels, params.data.image_size
    settings = map_settings(params)
    crop = params.train.crop if params.train.crop and params.train.crop < size else None
    detector = build_detector(params.model, channels, size, cfg.score_weight, settings, crop)
    detector.generator.load_state_dict(state["generator"])
    detector.discriminator.load_state_dict(state["discriminator"])
    tc = params.train
    runtime = resolve_runtime(tc.device, tc.precision, tc.channels_last, tc.compile, tc.threads)
    detector.to(runtime.device)
    g, d = detector.generator, detector.discriminator
    synthetic = make_synthetic_validation(splits.val.images, params.train.synthetic)
    choice = None
    if params.model.name == "nested_restore" and "auto" in (cfg.map_sigma, cfg.map_top_k):
        raw = score_images(g, d, synthetic.images, cfg.score_weight, runtime, cfg.batch_size,
                           MapSettings(sigma=0.0, top_k=settings.top_k), with_maps=True)
        choice = choose_map_settings(raw.maps, synthetic, cfg.map_sigma, cfg.map_top_k)
        settings = detector.settings = choice.settings
    val = score_images(g, d, splits.val.images, cfg.score_weight, runtime, cfg.batch_size,
                       settings, with_maps=True)
    map_stats = fit_map_stats(val.maps)  # display scale of maps: validation normals only
    detector.set_map_statistics(map_stats.low, map_stats.high)
    if choice:  # the chosen candidate's figures: the same maps, not scored a second time
        found = choice.report
    else:
        scored = score_images(g, d, synthetic.images, cfg.score_weight, runtime,
                              cfg.batch_size, settings, with_maps=True)
        found = synthetic_validation_report(scored.score, scored.maps, synthetic)
    # The test split is scored once, after everything above is fixed.
    test = score_images(g, d, splits.test.images, cfg.score_weight, runtime, cfg.batch_size,
                        settings, with_maps=True)
    report = evaluate_scores(val.score, test.score, splits.test.is_anomaly, cfg, state["epoch"])
    report.extra["synthetic_validation"] = {
        "protocol": "validation normals + synthetic anomalies made from them "
                    f"(seed {params.train.synthetic.val_seed}); no test data",
        "image_auroc": found.image_auroc, "pixel_auroc": found.pixel_auroc}
    if params.model.name == "nested_restore":  # maps are probabilities: 0.5 means "anomalous"
        report.extra["validation_normals"] = {
            "protocol": "maps of the validation normals (as scored, before display "
                        "normalisation); no test data",
            **hot_normal_figures(val.maps)}
    report.extra["map_settings"] = {"sigma": settings.sigma, "top_k": settings.top_k,
                                    "chosen_on": "synthetic validation" if choice else
                                    "params.yaml",
                                    **({"candidates": choice.candidates} if choice else {})}
    report.extra["map_normalisation"] = {"low": map_stats.low, "high": map_stats.high}
    masks = getattr(splits.test, "masks", None)
    if masks is not None and np.asarray(masks).any():
        truth = np.asarray(masks)
        report.extra["pixel"] = {
            "protocol": "leak-free: maps of the sealed test split against its ground-truth "
                        "masks at the model input size",
            "auroc": pixel_auroc(test.maps, truth), "aupro": aupro(test.maps, truth, 0.3)}
    report.extra["per_defect"] = per_defect_figures(
        test.score, splits.test.labels, splits.test.is_anomaly, test.maps,
        None if masks is None else np.asarray(masks))
    report.extra["runtime"] = {"device": str(runtime.device),
                               "precision": "bf16" if runtime.amp_dtype else "fp32"}
    reference = monitoring_reference(splits, val.score, report.norm, cfg.threshold,
                                     params.data.source)
    save_detector(out / "model" / MODEL_FILE, detector.cpu(), params.model, channels, size,
                  report.norm, cfg.threshold,
                  provenance={"checkpoint_epoch": state["epoch"],
                              "data_source": params.data.source},
                  disc_image_size=crop, monitoring=reference, rules=image_rules(params.data))
    write_metrics(report, out / "metrics.json")
    (out / MONITORING_REFERENCE).write_text(json.dumps(reference, indent=1) + "\n")
    normed = normalise(test.score, report.norm.score_min, report.norm.score_max, clip=False)
    threshold = report.norm.threshold(cfg.threshold)
    with (out / "test_scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "is_anomaly", "score", "normalised_score",
                         "flagged"])
        for row in zip(splits.test.paths, splits.test.labels, splits.test.is_anomaly,
                       test.score, np.clip(normed, 0.0, 1.0), strict=True):
            writer.writerow([*row[:3], f"{row[3]:.6g}", f"{row[4]:.6f}", int(row[4] >= threshold)])
    if cfg.plots:
        inputs, recons = _grid(detector, splits.test, cfg.grid_images)
        write_plots(out / "plots", splits.test.is_anomaly, normed, report.norm, inputs, recons,
                    title=f"({params.model.name}, anomalous: {params.data.anomalous_class})")
    if cfg.overlay_images and len(splits.test):
        write_overlays(out / "plots" / "overlays.png", splits.test, test.score,
                       normalise_maps(test.maps, map_stats), cfg.overlay_images)
    evaluation_report(params, out, splits.test, test.score, normalise_maps(test.maps, map_stats),
                      val.score, report)  # out/report/index.html
    return report


def monitoring_reference(splits: DatasetSplits, val_scores: np.ndarray, norm, which: str,
                         source: str) -> dict:
    """What ``nestad monitor`` compares incoming images with: the validation normals'
    scores and image statistics, the source sizes and band counts of the normal training
    images (manifest rows of the train and val splits; sizes unknown there are skipped).
    Band counts are known only for an ingested dataset (probed at ingestion); a raw
    folder's manifest holds the configured channels, so none is recorded for it."""
    from components.data.manifest import MANIFEST_NAME

    manifest = splits.manifest
    if not {"split", "width", "height", "channels"} <= set(manifest.columns):
        # a hand-made split without manifest rows: no sizes or bands known
        manifest = manifest.reindex(columns=["split", "width", "height", "channels"])
    rows = manifest[manifest["split"].isin(["train", "val"])]
    ingested = (Path(source).expanduser() / MANIFEST_NAME).is_file()
    return build_reference(val_scores, splits.val.images.numpy(),
                           zip(rows["width"], rows["height"], strict=True),
                           rows["channels"] if ingested else [],
                           norm.threshold(which), which)


def write_overlays(path: Path, test, scores: np.ndarray, maps01: np.ndarray, n: int) -> None:
    """The ``n`` highest-scoring test images with their maps (and masks when known)."""
    top = np.argsort(-scores, kind="stable")[:n]
    images = test.images[torch.from_numpy(top)].permute(0, 2, 3, 1).numpy()
    masks = getattr(test, "masks", None)
    grid = overlay_grid(list(images), list(maps01[top]), [float(s) for s in scores[top]],
                        labels=[test.labels[i] for i in top],
                        masks=None if masks is None else list(np.asarray(masks)[top]))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


@torch.no_grad()
def _grid(detector, test, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Half normal, half anomalous test inputs and their reconstructions, (n, H, W, C) uint8."""
    if n == 0:
        return np.zeros((0,)), np.zeros((0,))
    normal = np.flatnonzero(test.is_anomaly == 0)[: n // 2]
    anomalous = np.flatnonzero(test.is_anomaly == 1)[: n - len(normal)]
    idx = torch.from_numpy(np.concatenate([normal, anomalous]))
    x = to_model_input(test.images[idx]).to(next(detector.parameters()).device)
    recon = detector.generator.eval()(x).image.float().clamp(-1, 1)

    def to_uint8(t: torch.Tensor) -> np.ndarray:
        return ((t + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    return to_uint8(x), to_uint8(recon)


def score_paths(model: Path, paths: list[Path], out_csv: Path | None,
                batch_size: int = 256, threshold: str | None = None,
                maps_dir: Path | None = None, report_dir: Path | None = None,
                backend: str = "torch") -> list[dict]:
    """Score image files with a saved model; rows of path, score, normalised, is_anomaly.

    With ``maps_dir`` each image's heat-map overlay is written there and its row gains
    ``map`` (the file): the source image at its own size, with the normalised anomaly map
    upsampled bilinearly to that size. Files are ``<stem>_map.png``; a stem seen before (the
    same name in another folder) gets ``<stem>_map-2.png``, ``-3``, ... in row order.
    With ``report_dir`` an inspection report of the batch is written there (index.html).
    ``backend`` onnx | openvino scores with the verified export ``find_export`` finds for
    ``model`` instead of the PyTorch detector: the same rows and columns.
    """
    from components.data.images import decode_image_original
    from components.detector.map_metrics import upsample_maps
    from components.detector.overlay import overlay
    from components.errors import DataError

    if backend == "torch":
        detector, meta = load_detector(model)
        norm = meta["norm"]
        if threshold:
            detector.threshold.fill_(norm.threshold(threshold))
    else:
        from components.export.runners import ExportedDetector

        detector = ExportedDetector.load(model, backend, threshold)
        meta = detector.meta
    rules = meta["image_rules"]  # training's: what it refused is not scored
    images, names = load_images(paths, meta["image_size"], meta["channels"], rules=rules)
    if maps_dir is not None:
        maps_dir.mkdir(parents=True, exist_ok=True)
    stems: dict[str, int] = {}
    rows = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size])
        if maps_dir is None:
            score, normed, flagged = detector(x)
        else:
            score, normed, flagged, maps01 = detector.score_with_maps(x)  # (B, 1, h, w)
        for i in range(len(x)):
            name = names[start + i]
            row = {"path": name, "score": float(score[i]),
                   "normalised_score": float(normed[i]), "is_anomaly": bool(flagged[i])}
            if maps_dir is not None:
                try:
                    data = Path(name).read_bytes()
                except OSError as exc:
                    raise DataError(f"{name}: cannot read ({exc.strerror})") from None
                source = decode_image_original(data, name, 3, rules)  # (H, W, 3), upright
                full = upsample_maps(maps01[i : i + 1], source.shape[:2])[0, 0].numpy()
                stem = Path(name).stem
                stems[stem] = stems.get(stem, 0) + 1
                suffix = "" if stems[stem] == 1 else f"-{stems[stem]}"
                target = maps_dir / f"{stem}_map{suffix}.png"
                overlay(source, full).save(target)
                row["map"] = str(target)
            rows.append(row)
    if out_csv:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with out_csv.open("w", newline="") as fh:
            columns = ["path", "score", "normalised_score", "is_anomaly"]
            writer = csv.DictWriter(fh, fieldnames=columns + (["map"] if maps_dir else []))
            writer.writeheader()
            writer.writerows(rows)
    if report_dir is not None:
        batch_report(report_dir, detector, meta, model, images, rows, threshold, batch_size)
    return rows
