"""Inspection reports: ``DIR/index.html`` with its pictures in ``DIR/images/``, built from
scored images as plain arrays.

Two kinds: after an evaluation (labels known: both protocols' metrics, per-type figures,
false positives and false negatives first) and for a batch of new images (no labels:
flagged images first). Images are shown at the model input size, each with its heat-map
overlay (the map normalised on validation normals; the true defect outlined in magenta
when a mask is known). Static files only: the page opens offline, without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.detector.overlay import outline_mask, overlay
from components.errors import NestadError
from components.report import figures
from components.report.html import render
from components.report.page import Card, Figure, Gallery, InspectionPage, Picture, Table

INDEX = "index.html"
IMAGES = "images"

MapSource = Callable[[np.ndarray], np.ndarray]
"""Given image indices (k,), their anomaly maps normalised to [0, 1], (k, h, w)."""


@dataclass(frozen=True)
class ScoredImages:
    """Images and what the detector said about them.

    ``scores`` are normalised with the validation normals' min and max (unclipped);
    ``flagged`` is the detector's verdict at the chosen threshold. ``maps`` gives the
    maps of the images shown (so a large batch need not hold every map). ``labels``,
    ``is_anomaly`` and ``masks`` are the truth, when known.
    """

    names: Sequence[str]
    images: np.ndarray  # (N, H, W, C) uint8, as the model saw them
    scores: np.ndarray  # (N,)
    raw_scores: np.ndarray  # (N,)
    flagged: np.ndarray  # (N,) bool
    maps: MapSource | None = None
    labels: Sequence[str] | None = None
    is_anomaly: np.ndarray | None = None  # (N,) 1 = anomalous
    masks: np.ndarray | None = None  # (N, H, W), nonzero = defect pixel

    def __post_init__(self) -> None:
        n = len(self.names)
        sizes = {"images": len(self.images), "scores": len(self.scores),
                 "raw_scores": len(self.raw_scores), "flagged": len(self.flagged)}
        for name in ("labels", "is_anomaly", "masks"):
            if getattr(self, name) is not None:
                sizes[name] = len(getattr(self, name))
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise ValueError(f"expected {n} entries like names; got {wrong}")


# --- what goes where ------------------------------------------------------------------------

_EVALUATION_GROUPS = (
    ("fp", "False positives", "normal images flagged at the chosen threshold"),
    ("fn", "False negatives", "anomalous images not flagged at the chosen threshold"),
    ("tp", "True positives", "anomalous images flagged"),
    ("tn", "True negatives", "normal images not flagged"),
)
_BATCH_GROUPS = (
    ("flagged", "Flagged", "images at or above the chosen threshold"),
    ("passed", "Not flagged", "images below the chosen threshold"),
)
_VERDICTS = {"fp": "false positive", "fn": "false negative", "tp": "true positive",
             "tn": "true negative"}


def inspection_order(scores: np.ndarray, flagged: np.ndarray,
                     is_anomaly: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
    """The gallery groups in page order, each ``(key, indices)`` highest score first
    (ties in input order): with the truth, false positives, false negatives, true
    positives, true negatives; without it, flagged then not flagged. Every image is in
    exactly one group."""
    scores = np.asarray(scores, dtype=np.float64)
    flagged = np.asarray(flagged).astype(bool)
    if is_anomaly is None:
        masks = {"flagged": flagged, "passed": ~flagged}
    else:
        truth = np.asarray(is_anomaly).astype(bool)
        masks = {"fp": flagged & ~truth, "fn": ~flagged & truth,
                 "tp": flagged & truth, "tn": ~flagged & ~truth}
    order = np.argsort(-scores, kind="stable")
    return [(key, order[mask[order]]) for key, mask in masks.items()]


def _write_pictures(folder: Path, scored: ScoredImages, shown: np.ndarray
                    ) -> dict[int, tuple[Picture, ...]]:
    """The input and its heat-map overlay (mask outlined) of each shown image, as
    ``images/img-<index>.png`` and ``images/img-<index>-map.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = scored.maps(shown) if scored.maps is not None and len(shown) else None
    pictures: dict[int, tuple[Picture, ...]] = {}
    for row, index in enumerate(shown):
        image = np.asarray(scored.images[index])
        plain = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
        stem = f"img-{int(index):05d}"
        plain.save(folder / f"{stem}.png")
        entry = [Picture(f"{IMAGES}/{stem}.png", "input")]
        if maps is not None:
            heat = overlay(image, np.asarray(maps[row]))
            has_mask = scored.masks is not None and np.asarray(scored.masks[index]).any()
            if has_mask:
                heat = outline_mask(heat, scored.masks[index])
            heat.save(folder / f"{stem}-map.png")
            alt = "anomaly map" + (", true defect outlined" if has_mask else "")
            entry.append(Picture(f"{IMAGES}/{stem}-map.png", alt))
        pictures[int(index)] = tuple(entry)
    return pictures


def _galleries(folder: Path, scored: ScoredImages, per_group: int) -> tuple[Gallery, ...]:
    # ranked by the raw score: the same order as the unclipped normalised one, and a
    # batch's normalised scores come clipped (ties at 0 and 1)
    groups = inspection_order(scored.raw_scores, scored.flagged, scored.is_anomaly)
    described = {key: (title, note) for key, title, note in _EVALUATION_GROUPS + _BATCH_GROUPS}
    shown = {key: indices[:per_group] for key, indices in groups}
    everything = np.concatenate([v for v in shown.values()]) if shown else np.array([], int)
    pictures = _write_pictures(folder / IMAGES, scored, everything.astype(int))
    galleries = []
    for key, indices in groups:
        title, note = described[key]
        cards = tuple(
            Card(name=str(scored.names[i]), score=float(np.clip(scored.scores[i], 0.0, 1.0)),
                 raw_score=float(scored.raw_scores[i]), flagged=bool(scored.flagged[i]),
                 pictures=pictures[int(i)],
                 label=None if scored.labels is None else str(scored.labels[i]),
                 verdict=_VERDICTS.get(key))
            for i in shown[key]
        )
        galleries.append(Gallery(key, title, note, cards, total=len(indices)))
    return tuple(galleries)


# --- tables ---------------------------------------------------------------------------------


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4f}"
    return str(value)


_CLASSIFICATION = ("auroc", "auprc", "f1", "precision", "recall", "fpr", "threshold")


def metric_tables(metrics: Mapping[str, Any]) -> tuple[Table, ...]:
    """The figures of ``metrics.json``, one table per protocol, each with its label."""
    tables = []
    lf = metrics.get("leak_free")
    if isinstance(lf, Mapping):
        rows = []
        for key, name in (("at_fixed_threshold", "fixed threshold"),
                          ("at_target_fpr", "target-FPR threshold")):
            if isinstance(lf.get(key), Mapping):
                rows.append((name, *(_number(lf[key].get(k)) for k in _CLASSIFICATION)))
        chosen = lf.get("threshold_used")
        tables.append(Table(
            f"Leak-free protocol (nestad's; chosen threshold: {chosen})",
            str(lf.get("protocol", "")), ("threshold", *_CLASSIFICATION), tuple(rows)))
    pc = metrics.get("paper_compatible")
    if isinstance(pc, Mapping):
        tables.append(Table("Paper-compatible protocol (reference code; for comparison only)",
                            str(pc.get("protocol", "")), _CLASSIFICATION,
                            ((*(_number(pc.get(k)) for k in _CLASSIFICATION),),)))
    px = metrics.get("pixel")
    if isinstance(px, Mapping):
        tables.append(Table("Pixel metrics (test masks)", str(px.get("protocol", "")),
                            ("pixel AUROC", "AUPRO (FPR ≤ 0.3)"),
                            ((_number(px.get("auroc")), _number(px.get("aupro"))),)))
    sv = metrics.get("synthetic_validation")
    if isinstance(sv, Mapping):
        tables.append(Table("Synthetic validation (no test data; not a test figure)",
                            str(sv.get("protocol", "")), ("image AUROC", "pixel AUROC"),
                            ((_number(sv.get("image_auroc")), _number(sv.get("pixel_auroc"))),)))
    thresholds = metrics.get("thresholds")
    if isinstance(thresholds, Mapping):
        rows = tuple((name, _number(t.get("value")), _number(t.get("validation_normal_fpr")))
                     for name, t in thresholds.items() if isinstance(t, Mapping))
        tables.append(Table(f"Thresholds (chosen: {thresholds.get('used')})",
                            "on the normalised score; the share of validation normals each "
                            "flags is its false-positive rate on normal images, measured "
                            "without test data", ("threshold", "value",
                                                  "FPR on validation normals"), rows))
    counts = metrics.get("counts")
    if isinstance(counts, Mapping):
        tables.append(Table("Images", "", tuple(counts), (tuple(_number(v) for v in
                                                                counts.values()),)))
    return tuple(tables)


def named_thresholds(norm: Mapping[str, Any], chosen: str) -> tuple[dict[str, float], str]:
    """The two thresholds of the normalisation statistics (``NormStats`` as a dict) by
    display name, and the display name of ``chosen`` (``fixed`` | ``fpr``)."""
    fixed = f"fixed {float(norm['threshold_fixed']):g}"
    fpr = f"FPR {float(norm['target_fpr']):g} on validation normals"
    values = {fixed: float(norm["threshold_fixed"]), fpr: float(norm["threshold_fpr"])}
    return values, fpr if chosen == "fpr" else fixed


def type_table(labels: Sequence[str], is_anomaly: np.ndarray, scores: np.ndarray,
               flagged: np.ndarray, threshold_name: str,
               per_defect: Mapping[str, Mapping[str, Any]]) -> Table:
    """Per label: images, flagged at the chosen threshold, and for anomalous types the
    image AUROC of that type against all normal test images (``per_defect``: the
    evaluation's ``per_defect`` figures, computed once there)."""
    labels = [str(x) for x in labels]
    truth = np.asarray(is_anomaly).astype(bool)
    scores, flagged = np.asarray(scores, dtype=np.float64), np.asarray(flagged).astype(bool)
    normal = ~truth
    rows = []
    for name in sorted(set(labels), key=lambda n: (truth[labels.index(n)], n)):
        mine = np.array([x == name for x in labels])
        kind = "anomalous" if truth[mine].all() else "normal" if normal[mine].all() else "mixed"
        figure = per_defect.get(name, {}).get("image_auroc") if kind == "anomalous" else None
        auroc = "-" if figure is None else _number(figure)
        hits = int(flagged[mine].sum())
        rows.append((name, kind, str(int(mine.sum())), str(hits),
                     _number(hits / max(int(mine.sum()), 1)),
                     _number(float(np.median(np.clip(scores[mine], 0.0, 1.0)))), auroc))
    return Table("Per type (test split)", f"flagged: at the chosen threshold ({threshold_name}); "
                 "for a defect type the share flagged is its recall, for normal images the "
                 "false-positive rate; AUROC: that type against all normal test images",
                 ("type", "class", "images", "flagged", "share flagged", "median score",
                  "AUROC vs normals"), tuple(rows))


# --- the two reports ------------------------------------------------------------------------


def _write_page(folder: Path, page: InspectionPage) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / INDEX
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(render(page), encoding="utf-8")
    tmp.replace(target)
    return target


def _prepare(folder: Path) -> None:
    """Make ``folder/images`` and remove the pictures of an earlier report there (names
    are per index); ``NestadError`` naming the folder when it cannot be written."""
    try:
        (folder / IMAGES).mkdir(parents=True, exist_ok=True)
        for old in (folder / IMAGES).glob("*.png"):
            old.unlink()
    except OSError as exc:
        raise NestadError(f"{folder}: cannot write the report there "
                          f"({exc.strerror or exc})") from None


def write_evaluation_report(folder: Path, scored: ScoredImages, metrics: Mapping[str, Any],
                            versions: Sequence[tuple[str, str]],
                            val_scores: np.ndarray | None = None, per_group: int = 48,
                            title: str = "nestad inspection report: evaluation") -> Path:
    """``folder/index.html`` for an evaluation: metrics of both protocols with their
    labels, the score histogram with the thresholds, per-type figures, the test images
    (false positives and false negatives first; up to ``per_group`` per group), the model
    and data versions. Returns the page's path."""
    if scored.is_anomaly is None or scored.labels is None:
        raise ValueError("an evaluation report needs the test labels")
    _prepare(folder)
    thresholds, chosen = named_thresholds(metrics["normalisation"],
                                          metrics["leak_free"]["threshold_used"])
    truth = np.asarray(scored.is_anomaly).astype(bool)
    groups = {"test normal": scored.scores[~truth], "test anomalous": scored.scores[truth]}
    if val_scores is not None:
        groups = {"validation normal": np.asarray(val_scores), **groups}
    hist = figures.score_histogram(folder / IMAGES / "score_histogram.png", groups, thresholds,
                                   chosen, "Scores of the test split")
    by_label: dict[str, list[float]] = {}
    for label, score in zip(scored.labels, scored.scores, strict=True):
        by_label.setdefault(str(label), []).append(float(score))
    order = sorted(by_label, key=lambda n: (truth[list(map(str, scored.labels)).index(n)], n))
    types = figures.scores_by_type(folder / IMAGES / "scores_by_type.png",
                                   {n: np.array(by_label[n]) for n in order}, thresholds, chosen)
    lf = metrics["leak_free"]
    summary = (f"{len(scored.names)} test images; leak-free AUROC {_number(lf.get('auroc'))}, "
               f"F1 {_number(lf.get('f1'))} at the {chosen} threshold "
               f"({thresholds[chosen]:.3f} on the normalised score); "
               f"{int((scored.flagged & ~truth).sum())} false positives, "
               f"{int((~scored.flagged & truth).sum())} false negatives.")
    page = InspectionPage(
        title=title, summary=summary, versions=tuple(versions),
        tables=metric_tables(metrics),
        figures=(Figure(Picture(f"{IMAGES}/{hist.name}", "score histogram"),
                        "Normalised scores (leak-free normalisation: validation normals' min "
                        "and max) with both thresholds; the thick line is the one applied."),
                 Figure(Picture(f"{IMAGES}/{types.name}", "scores per type"),
                        "Scores per test label: box (quartiles) and every image as a dot.")),
        type_tables=(type_table(scored.labels, scored.is_anomaly, scored.scores, scored.flagged,
                                chosen, metrics.get("per_defect", {})),),
        galleries=_galleries(folder, scored, per_group),
        notes=("Images are shown at the model input size: the input, then its anomaly map "
               "as a heat overlay (blue 0 to red 1, normalised on validation normals)"
               + ("; the true defect is outlined in magenta." if scored.masks is not None
                  else "."),),
    )
    return _write_page(folder, page)


def write_batch_report(folder: Path, scored: ScoredImages, thresholds: Mapping[str, float],
                       chosen: str, versions: Sequence[tuple[str, str]], per_group: int = 48,
                       title: str = "nestad inspection report: scored batch") -> Path:
    """``folder/index.html`` for a batch of new images (no labels): the score histogram
    with the thresholds, the images flagged first (up to ``per_group`` per group), the
    model version. Returns the page's path."""
    _prepare(folder)
    hist = figures.score_histogram(folder / IMAGES / "score_histogram.png",
                                   {"scored images": scored.scores}, thresholds, chosen,
                                   "Scores of the batch")
    flagged = int(np.asarray(scored.flagged).sum())
    page = InspectionPage(
        title=title,
        summary=(f"{len(scored.names)} images scored; {flagged} flagged at the {chosen} "
                 f"threshold ({thresholds[chosen]:.3f} on the normalised score). No labels: "
                 "these are the detector's verdicts, not measured accuracy."),
        versions=tuple(versions),
        figures=(Figure(Picture(f"{IMAGES}/{hist.name}", "score histogram"),
                        "Normalised scores (validation normals' min and max) with both "
                        "thresholds; the thick line is the one applied."),),
        galleries=_galleries(folder, scored, per_group),
        notes=("Images are shown at the model input size: the input, then its anomaly map "
               "as a heat overlay (blue 0 to red 1, normalised on validation normals).",),
    )
    return _write_page(folder, page)
